"""Scale benchmark: memory bounded in bytes at d = 4,096, row groups that stay small, and
batches that reach batch_size.

    python benchmarks/scale.py           # d=4096, 16 modules, 8 x 512-token batches (~2 min)
    python benchmarks/scale.py --tiny    # CI: d=256, 4 modules, 4 x 64-token batches (seconds)

The model is a small custom `PreTrainedModel` that is wide but cheap per token, so the run
measures crowstream and not the model: an embedding into a d-wide residual stream, then
`--modules` blocks, each a low-rank (rank 8) update plus an elementwise map. A GPT-2 with
n_embd = 4,096 would spend minutes per batch on 2 cores in its attention projections.

Each measurement runs in a fresh child process that builds the same model and documents
(every document longer than the context, so every batch is full: batch_size x context):
- bare: a loop over the same batches that copies the same modules' kept rows to new host
  tensors (one batch in flight, then dropped), as any capture must at least do;
- crowstream at each `--budgets` value of `max_inflight_bytes`.
Reported: each child's peak RSS (ru_maxrss) above its RSS just before the loop, and
crowstream's peak above the bare loop's, against budget x 1.25; the row groups' sizes
(Parquet total_byte_size) against row_group_bytes; and the documents per batch reached.

Commit cost over 2,000 real commits is measured by the commit-record work (see
`commit_times`); this script leaves that column to it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from throughput import mib, peak_rss_bytes, rss_bytes  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

BUDGET_SLACK = 1.25  # crowstream's peak above the bare loop stays within budget x this
FULL = {"d": 4096, "modules": 16, "batch_size": 8, "context": 512, "batches": 4,
        "budgets": [512 << 20, 2 << 30]}
TINY = {"d": 256, "modules": 4, "batch_size": 4, "context": 64, "batches": 6,
        "budgets": [256 << 10, 2 << 20]}
VOCAB = 512


# -- the wide, cheap model -----------------------------------------------------------------

def build_model(d: int, n_blocks: int):
    """-> (model, tokenizer): a d-wide residual stream, `n_blocks` cheap blocks named
    `blocks.<i>`, and a word-level tokenizer over the words w0 .. w{VOCAB-1}."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerFast

    class WideConfig(PretrainedConfig):
        model_type = "crowstream-wide-bench"

        def __init__(self, d=64, n_blocks=1, vocab_size=VOCAB, max_position_embeddings=4096, **kw):
            self.d, self.n_blocks = d, n_blocks
            self.max_position_embeddings = max_position_embeddings
            super().__init__(vocab_size=vocab_size, **kw)

    class Block(torch.nn.Module):
        def __init__(self, d: int):
            super().__init__()
            self.down = torch.nn.Linear(d, 8, bias=False)
            self.up = torch.nn.Linear(8, d, bias=False)
            self.scale = torch.nn.Parameter(torch.ones(d) * 0.9)

        def forward(self, x):  # [B, T, d] -> [B, T, d], O(d) work per token
            return x * self.scale + self.up(torch.tanh(self.down(x)))

    class WideModel(PreTrainedModel):
        config_class = WideConfig

        def __init__(self, config):
            super().__init__(config)
            self.embed = torch.nn.Embedding(config.vocab_size, config.d)
            self.blocks = torch.nn.ModuleList(Block(config.d) for _ in range(config.n_blocks))
            self.post_init()

        def get_input_embeddings(self):
            return self.embed

        def forward(self, input_ids=None, attention_mask=None, **kwargs):
            x = self.embed(input_ids)
            for block in self.blocks:
                x = block(x)
            return x

    torch.manual_seed(0)
    model = WideModel(WideConfig(d=d, n_blocks=n_blocks)).eval()
    vocab = {f"w{i}": i for i in range(VOCAB)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="w0", pad_token="w0")
    return model, tokenizer


def documents(n: int, context: int) -> list[str]:
    """`n` documents of context + 7 words each (all truncated to exactly `context`)."""
    import numpy as np

    rng = np.random.default_rng(0)
    return [" ".join(f"w{t}" for t in rng.integers(1, VOCAB, context + 7)) for _ in range(n)]


# -- one measurement per child process -------------------------------------------------------

def child(args) -> int:
    import crowstream

    spec = json.loads(args.spec)
    model, tokenizer = build_model(spec["d"], spec["modules"])
    modules = [f"blocks.{i}" for i in range(spec["modules"])]
    docs = documents(spec["batch_size"] * spec["batches"], spec["context"])
    # warm up first (imports, allocator pools, nnsight's first wrap): one-time costs, not
    # bytes in flight; both the bare loop and crowstream get the same warm-up
    warm = {**spec, "batch_size": 1}
    bare_loop(model, tokenizer, docs[:1], modules, warm)
    crowstream.capture(model, docs[:1], modules, args.out + "-warm", tokenizer=tokenizer,
                       context_size=spec["context"], progress=False)
    shutil.rmtree(args.out + "-warm")
    batch_docs: list[int] = []
    model.register_forward_pre_hook(lambda m, a, kw: batch_docs.append(
        int((a[0] if a else kw["input_ids"]).shape[0])), with_kwargs=True)
    before = rss_bytes()  # now, after the warm-up (whose own peak stays far below the run's)
    start = time.perf_counter()
    result = {}
    if args.budget is None:
        bare_loop(model, tokenizer, docs, modules, spec)
    else:
        run = crowstream.capture(model, docs, modules, args.out, tokenizer=tokenizer,
                                 batch_size=spec["batch_size"], context_size=spec["context"],
                                 max_batch_tokens=spec["batch_size"] * spec["context"],
                                 max_inflight_bytes=args.budget, progress=False)
        result = {"row_groups": row_group_sizes(args.out), "tokens": run.manifest.counts.tokens_fed}
    result.update(seconds=time.perf_counter() - start, peak=peak_rss_bytes(), before=before,
                  batch_docs=batch_docs[1:] if args.budget is not None else batch_docs)  # [0]: probe
    print("RESULT " + json.dumps(result), flush=True)
    return 0


def bare_loop(model, tokenizer, docs, modules, spec) -> None:
    """The same batches; each module's kept rows copied to a new host tensor, then dropped."""
    import torch

    kept = {}
    hooks = [model.get_submodule(name).register_forward_hook(
        lambda m, a, out, name=name: kept.__setitem__(name, out.reshape(-1, out.shape[-1]).clone()))
        for name in modules]
    size = spec["batch_size"]
    with torch.inference_mode():
        for i in range(0, len(docs), size):
            encoded = tokenizer(docs[i:i + size], truncation=True, max_length=spec["context"],
                                padding=True, return_tensors="pt")
            model(**encoded)
            kept.clear()  # one batch in flight, then dropped
    for hook in hooks:
        hook.remove()


def row_group_sizes(out: str) -> list[int]:
    import pyarrow.parquet as pq

    sizes = []
    for root, _, files in os.walk(os.path.join(out, "data")):
        for name in files:
            meta = pq.ParquetFile(os.path.join(root, name)).metadata
            sizes += [meta.row_group(g).total_byte_size for g in range(meta.num_row_groups)]
    return sizes


def commit_times(out: str):
    """TODO(scale): first and last 10% of 2,000 real commits; measured with the commit
    records (one small record per shard), not here. Returns None until then."""
    return None


def start(spec: dict, budget: int | None, out: str, threads: int | None) -> subprocess.Popen:
    """A child measuring the bare loop (`budget` None) or a capture at `budget`."""
    command = [sys.executable, os.path.abspath(__file__), "--child", "--spec", json.dumps(spec),
               "--out", out]
    if budget is not None:
        command += ["--budget", str(budget)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads or os.environ.get("OMP_NUM_THREADS", 2))}
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)


def result(child_process: subprocess.Popen) -> dict:
    stdout, stderr = child_process.communicate()
    if child_process.returncode != 0:
        raise SystemExit(f"child failed ({child_process.returncode}):\n{stdout}\n{stderr}")
    line = next(line for line in stdout.splitlines() if line.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def measure_all(spec: dict, root: str, threads: int | None, together: bool) -> dict:
    """{None: the bare loop, budget: the capture at it}, each in its own child process:
    one after another (full size: the printed seconds are then each run's own), or side by
    side (--tiny: each child's ru_maxrss is still its own, and the wall time shrinks)."""
    budgets = [None, *spec["budgets"]]
    outs = {b: os.path.join(root, "bare" if b is None else f"out-{b}") for b in budgets}
    if together:
        running = {b: start(spec, b, outs[b], threads) for b in budgets}
        return {b: result(running[b]) for b in budgets}
    return {b: result(start(spec, b, outs[b], threads)) for b in budgets}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="CI size: seconds")
    parser.add_argument("--tmp", help="directory for the outputs (default: a temp dir)")
    parser.add_argument("--threads", type=int, help="OMP threads per child (default 2)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--budget", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child(args)

    from crowstream.schemas import ROW_GROUP_BYTES

    spec = TINY if args.tiny else FULL
    batch_bytes = spec["batch_size"] * spec["context"] * spec["modules"] * (16 + 4 * spec["d"])
    print(f"model: d={spec['d']}, {spec['modules']} modules captured, batches of "
          f"{spec['batch_size']} x {spec['context']} tokens, {spec['batches']} batches; "
          f"kept rows per batch {mib(batch_bytes)}")
    root = tempfile.mkdtemp(prefix="crowstream-scale-", dir=args.tmp)
    ok = True
    try:
        results = measure_all(spec, root, args.threads, together=args.tiny)
        bare = results[None]
        bare_extra = bare["peak"] - bare["before"]
        print(f"bare loop: peak RSS +{mib(bare_extra)} over the loaded model "
              f"({bare['seconds']:.1f} s)")
        for budget in spec["budgets"]:
            out = os.path.join(root, f"out-{budget}")
            got = results[budget]
            extra = got["peak"] - got["before"]
            above = extra - bare_extra
            within = above <= budget * BUDGET_SLACK
            groups = got["row_groups"]
            small = max(groups) <= ROW_GROUP_BYTES
            full = all(n == spec["batch_size"] for n in got["batch_docs"])
            ok &= within and small and full
            print(f"max_inflight_bytes {mib(budget)}: peak RSS +{mib(extra)}, above the bare loop "
                  f"{mib(above)} (limit {mib(budget * BUDGET_SLACK)}: {'OK' if within else 'OVER'}); "
                  f"{got['seconds']:.1f} s")
            print(f"  row groups: {len(groups)}, total_byte_size {mib(min(groups))} .. "
                  f"{mib(max(groups))} (row_group_bytes {mib(ROW_GROUP_BYTES)}: "
                  f"{'OK' if small else 'OVER'})")
            print(f"  documents per batch: {sorted(set(got['batch_docs']))} "
                  f"(batch_size {spec['batch_size']}: {'OK' if full else 'NOT REACHED'})")
            times = commit_times(out)
            print(f"  commit time first/last 10%: {times if times else 'measured by the commit-record work'}")
            shutil.rmtree(out)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    if args.tiny:  # allocator and import noise (~MiBs) dwarfs budgets of a few hundred KiB
        print("targets: judged at full size only (--tiny checks that everything runs)")
    else:
        print("targets: " + ("all met" if ok else "NOT MET"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
