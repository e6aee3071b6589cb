"""Budget benchmark: does `max_inflight_bytes` bound what a capture holds? (#15 item 6)

    python benchmarks/budget.py            # GPT-2-small shape, 1/4/11/32 modules x 256 MiB/512 MiB/2 GiB
    python benchmarks/budget.py --tiny     # CI: a d=64 model, 1/4 modules x 2 budgets, seconds

Each figure is the peak RSS (ru_maxrss) of a fresh child process that builds the same
random-weight GPT-2 (4 blocks, d = 768 unless --tiny) and runs over the same documents
(`--docs` long documents, batch_size 8, context_size 256):
- bare: a plain loop over the same batches (`torch.inference_mode`, forward hooks that
  copy every chosen module's output to the host, then drop it): the model's own cost;
- capture: `crowstream.capture` of the same modules with `max_inflight_bytes=budget`.
The target: capture <= bare + budget + 16 MiB x modules. Budgets below the smallest one the
writers honour are raised to it (crowstream warns); the table shows the budget used.
Printed: one row per (modules, budget), the slope of the peak per module, and whether
each row meets the target. Peak RSS, not time: the machine's load does not change it much.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import warnings

MIB = 1 << 20
PER_MODULE_BOOKKEEPING = 16 * MIB


def build(model_dir: str, tiny: bool) -> None:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from throughput import TINY, ModelSpec, build_model

    spec = TINY if tiny else ModelSpec(n_layer=4, n_embd=768, n_head=12, n_positions=256,
                                       vocab_size=8192)
    model, tokenizer = build_model(spec)
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)


def long_documents(n: int) -> list[str]:
    """`n` long documents: 8 paragraphs of Python's docs each (most fill 256 tokens)."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from throughput import documents

    paragraphs = documents(8 * n)
    return [" ".join(paragraphs[i:i + 8]) for i in range(0, 8 * n, 8)]


def capturable(model_dir: str, count: int) -> list[str]:
    """The first `count` modules (in model order) whose output is one row per token."""
    import crowstream as cs

    found = [name for name, _, shape in cs.modules(model_dir)
             if isinstance(shape, tuple) and len(shape) == 3 and ".h." in f".{name}"
             and "dropout" not in name]
    if len(found) < count:
        raise SystemExit(f"the model has only {len(found)} capturable modules, {count} asked")
    return found[:count]


def child(args) -> None:
    """One measurement in this fresh process: prints RESULT <json>."""
    import torch

    torch.set_num_threads(1)
    import crowstream as cs
    from transformers import AutoModelForCausalLM, AutoTokenizer

    docs = long_documents(args.docs)
    modules = args.modules.split(",")
    if args.budget == 0:
        model = AutoModelForCausalLM.from_pretrained(args.model).eval()
        tokenizer = AutoTokenizer.from_pretrained(args.model)
        tokenizer.pad_token = tokenizer.eos_token
        wanted = dict(model.named_modules())
        kept = []
        hooks = [wanted[m].register_forward_hook(
            lambda mod, inp, out: kept.append((out[0] if isinstance(out, tuple) else out).cpu().clone()))
            for m in modules]
        with torch.inference_mode():
            for start in range(0, len(docs), 8):
                batch = tokenizer(docs[start:start + 8], truncation=True, max_length=256,
                                  padding=True, return_tensors="pt")
                model(**batch, use_cache=False)
                kept.clear()
        for hook in hooks:
            hook.remove()
        used = 0
    else:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            run = cs.capture(args.model, docs, modules, args.out, batch_size=8, context_size=256,
                             max_inflight_bytes=args.budget, progress=False)
        used = run.manifest.config.get("max_inflight_bytes") or args.budget
        raised = [str(w.message) for w in caught if "budget" in str(w.message).lower()]
        if raised:
            print("NOTE", raised[0][:200], file=sys.stderr)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print("RESULT " + json.dumps({"peak": peak, "budget": used}), flush=True)


def measure(model_dir: str, modules: list[str], budget: int, docs: int, tmp: str) -> dict:
    out = tempfile.mkdtemp(dir=tmp, prefix="out-")
    done = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", "--model", model_dir,
                           "--modules", ",".join(modules), "--budget", str(budget),
                           "--docs", str(docs), "--out", os.path.join(out, "o")],
                          capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode or not lines:
        raise SystemExit(f"child failed ({done.returncode}):\n{done.stdout}\n{done.stderr[-3000:]}")
    return json.loads(lines[0][7:])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="d=64, 1/4 modules x 2 budgets (CI)")
    parser.add_argument("--docs", type=int, default=None, help="documents (default 96; 24 tiny)")
    parser.add_argument("--tmp", default=None)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--modules", help=argparse.SUPPRESS)
    parser.add_argument("--budget", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args)
        return 0
    docs = args.docs or (24 if args.tiny else 96)
    counts = [1, 4] if args.tiny else [1, 4, 11, 32]
    budgets = [256 * MIB, 2048 * MIB] if args.tiny else [256 * MIB, 512 * MIB, 2048 * MIB]
    with tempfile.TemporaryDirectory(dir=args.tmp, prefix="crowstream-budget-") as tmp:
        model_dir = os.path.join(tmp, "model")
        build(model_dir, args.tiny)
        names = capturable(model_dir, max(counts))
        print(f"model: {'tiny' if args.tiny else 'GPT-2-small shape, 4 blocks'}; {docs} documents, "
              "batch_size 8, context_size 256; peak RSS of a fresh process per row")
        print(f"{'modules':>7} {'budget MiB':>10} {'used MiB':>9} {'bare MiB':>9} {'capture MiB':>11} "
              f"{'limit MiB':>9}  target")
        rows, ok = [], True
        for count in counts:
            chosen = names[:count]
            bare = measure(model_dir, chosen, 0, docs, tmp)["peak"]
            for budget in budgets:
                got = measure(model_dir, chosen, budget, docs, tmp)
                limit = bare + got["budget"] + count * PER_MODULE_BOOKKEEPING
                met = got["peak"] <= limit
                ok &= met
                rows.append((count, budget, got["peak"] - bare))
                print(f"{count:>7} {budget / MIB:>10,.0f} {got['budget'] / MIB:>9,.0f} {bare / MIB:>9,.0f} "
                      f"{got['peak'] / MIB:>11,.0f} {limit / MIB:>9,.0f}  {'met' if met else 'MISSED'}")
        for budget in budgets:
            points = [(c, extra) for c, b, extra in rows if b == budget]
            (c0, e0), (c1, e1) = points[0], points[-1]
            slope = (e1 - e0) / max(c1 - c0, 1)
            print(f"slope at budget {budget / MIB:,.0f} MiB: {slope / MIB:,.1f} MiB per module above the bare loop")
        print(f"targets: {'met' if ok else 'MISSED'} (capture <= bare + budget + 16 MiB x modules)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
