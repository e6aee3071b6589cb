"""Memory benchmark: peak RSS of crowstream.capture stays flat as the corpus grows.

    python benchmarks/memory.py            # 250 vs 2,000 documents, small GPT-2, ~1 min on 2 cores
    python benchmarks/memory.py --tiny     # CI: 40 vs 160 documents, tiny GPT-2, seconds

Each capture runs in a fresh child process (so nothing left over from another run counts)
that loads the same locally built model (random weights, BPE tokenizer trained on Python's
docs) and captures two blocks to a temp dir with a small shard_size, so many shards are
committed. The big run's corpus is the small run's corpus repeated `--factor` times and
shard_size divides the small corpus, so both runs build exactly the same batches, shard
after shard: the only difference is how many documents (and shards) stream through. Any
growth of the peak is memory that accumulates with the corpus.

Reported per run: ru_maxrss of the child (its peak RSS over its whole life: interpreter,
libraries, model weights, and the capture), the high-water mark just before capture()
was called, and their difference (what the capture itself added at its peak).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from throughput import TINY, ModelSpec, build_model, documents, mib, peak_rss_bytes, rss_bytes  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

TARGET_GROWTH = 0.10
SMALL = ModelSpec(n_layer=4, n_embd=256, n_head=4, n_positions=256, vocab_size=4096)
MODULES = {"small": ["transformer.h.1", "transformer.h.3"], "tiny": ["transformer.h.0", "transformer.h.1"]}


def child(args) -> int:
    """One capture in this (fresh) process; prints one RESULT line of JSON."""
    import crowstream
    import crowstream.pipeline.run  # noqa: F401  (import everything capture needs before measuring)
    import datasets  # noqa: F401
    import nnsight  # noqa: F401
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    model = AutoModelForCausalLM.from_pretrained(args.model).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    docs = documents(args.docs, repeat_to=args.docs * args.factor)
    samples: list[tuple[float, int]] = []  # (time, RSS) every 20 ms while capture runs
    done = threading.Event()

    def sample():
        while not done.wait(0.02):
            samples.append((time.perf_counter(), rss_bytes() or 0))

    sampler = threading.Thread(target=sample, name="bench-rss", daemon=True)
    before_peak, before_now = peak_rss_bytes(), rss_bytes()
    start = time.perf_counter()
    sampler.start()
    run = crowstream.capture(model, docs, args.modules, args.out, tokenizer=tokenizer,
                             batch_size=args.batch_size, shard_size=args.shard_size, progress=False)
    seconds = time.perf_counter() - start
    done.set()
    sampler.join()
    # peak RSS in each of `factor` equal slices of the run's time: every slice streams about
    # as many documents as the 1x run, so a slice's peak is comparable with the 1x peak
    windows = [0] * args.factor
    for t, rss in samples:
        i = min(int((t - start) / seconds * args.factor), args.factor - 1)
        windows[i] = max(windows[i], rss)
    result = {"docs": run.docs, "tokens": run.manifest.counts.tokens_fed,
              "shards": len(run.manifest.shards), "seconds": seconds,
              "peak": peak_rss_bytes(), "before_peak": before_peak, "before_now": before_now,
              "after_now": rss_bytes(), "windows": windows}
    print("RESULT " + json.dumps(result), flush=True)
    return 0


def spawn(args, model_dir: str, out: str, factor: int) -> subprocess.Popen:
    command = [sys.executable, os.path.abspath(__file__), "--child", "--model", model_dir,
               "--out", out, "--docs", str(args.docs), "--factor", str(factor),
               "--shard-size", str(args.shard_size), "--batch-size", str(args.batch_size),
               "--threads", str(args.threads or 0), "--modules", *args.modules]
    env = dict(os.environ)
    if args.fixed_mmap_threshold:  # glibc: no dynamic threshold, big blocks go back to the OS
        env["MALLOC_MMAP_THRESHOLD_"] = str(128 * 1024)
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def result_of(child: subprocess.Popen, factor: int) -> dict:
    stdout, stderr = child.communicate()
    if child.returncode != 0:
        sys.stderr.write(stdout + stderr)
        raise SystemExit(f"the {factor}x capture failed (exit {child.returncode})")
    line = next(x for x in stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--docs", type=int, default=None, help="documents of the 1x run (default 250; 40 with --tiny)")
    parser.add_argument("--factor", type=int, default=None,
                        help="the big run has factor x docs (default 8; 4 with --tiny)")
    parser.add_argument("--shard-size", type=int, default=None,
                        help="documents per shard; must divide --docs (default 25; 10 with --tiny)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--tiny", action="store_true", help="2-layer d=64 model, 40 vs 160 docs: a CI smoke run")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads in the children (default 1: speed is not measured here, "
                             "and one thread is steady on a busy machine)")
    parser.add_argument("--fixed-mmap-threshold", action="store_true",
                        help="run the children with MALLOC_MMAP_THRESHOLD_=131072 (glibc), which "
                             "separates allocator retention from memory the capture really holds")
    parser.add_argument("--tmp", default=None, help="directory for the model and outputs (default: system temp)")
    parser.add_argument("--check", action="store_true", help="exit 1 when the target is missed")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--modules", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child(args)

    import shutil

    import torch

    kind = "tiny" if args.tiny else "small"
    spec = TINY if args.tiny else SMALL
    args.docs = args.docs or (40 if args.tiny else 250)
    args.factor = args.factor or (4 if args.tiny else 8)
    args.shard_size = args.shard_size or (10 if args.tiny else 25)
    args.modules = MODULES[kind]
    if args.threads is None:
        args.threads = 1
    if args.docs % args.shard_size:
        parser.error("--shard-size must divide --docs, so both runs build the same batches")

    tmp = tempfile.mkdtemp(prefix="crowstream-mem-", dir=args.tmp)
    children: dict[int, subprocess.Popen] = {}
    try:
        model_dir = os.path.join(tmp, "model")
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        model, tokenizer = build_model(spec)
        model.save_pretrained(model_dir)
        tokenizer.save_pretrained(model_dir)
        del model
        print(f"crowstream memory benchmark{' (--tiny)' if args.tiny else ''}")
        print(f"  model: GPT-2 shape, {spec.n_layer} layers, d={spec.n_embd}, {spec.n_positions} positions, "
              f"random weights; torch {torch.__version__}; modules {', '.join(args.modules)}")
        print(f"  corpus: {args.docs} paragraphs of Python's docs, repeated for the {args.factor}x run; "
              f"shard_size {args.shard_size}, batch size {args.batch_size}; each run in its own fresh process "
              f"({args.threads or torch.get_num_threads()} torch threads; load average {os.getloadavg()[0]:.2f})")
        # Side by side: each child's ru_maxrss is its own, and the wall time halves.
        factors = (1, args.factor)
        children.update({f: spawn(args, model_dir, os.path.join(tmp, f"out-{f}x"), f) for f in factors})
        results = {f: result_of(children[f], f) for f in factors}
        for factor in factors:
            r = results[factor]
            print(f"  {factor}x: {r['docs']:>6,} docs, {r['tokens']:>9,} tokens, {r['shards']:>3} shards "
                  f"in {r['seconds']:6.1f} s: peak RSS {mib(r['peak'])} "
                  f"(before capture {mib(r['before_peak'])}; capture added {mib(r['peak'] - r['before_peak'])}; "
                  f"RSS after capture {mib(r['after_now'])})")
        small, big = results[1], results[args.factor]
        windows = big["windows"]
        print(f"  {args.factor}x run, peak RSS in each 1/{args.factor} of its time (each streams about the "
              f"1x run's documents): {', '.join(f'{w / 2**20:,.0f}' for w in windows)} MiB")
        growth = big["peak"] / small["peak"] - 1
        added_small, added_big = small["peak"] - small["before_peak"], big["peak"] - big["before_peak"]
        print()
        print(f"RSS growth {args.factor}x docs: peak RSS {growth:+.1%} "
              f"(target < {TARGET_GROWTH:.0%}: {'met' if growth < TARGET_GROWTH else 'MISSED'})")
        later = windows[1:] or windows
        print(f"  steady state inside the {args.factor}x run: slices 2-{args.factor} peak between "
              f"{min(later) / 2**20:,.0f} and {max(later) / 2**20:,.0f} MiB; the last slice is "
              f"{windows[-1] / small['peak'] - 1:+.1%} vs the 1x run's peak (the first slice holds the set-up)")
        print(f"  capture's own increment (peak minus the high-water mark before capture): "
              f"{mib(added_small)} -> {mib(added_big)} ({(added_big - added_small) / 2**20:+,.1f} MiB "
              f"for {args.factor}x the documents)")
        print_budget_floor()
        return 1 if (args.check and growth >= TARGET_GROWTH) else 0
    finally:
        for running in children.values():
            if running.poll() is None:
                running.kill()
                running.wait()
        shutil.rmtree(tmp, ignore_errors=True)


def print_budget_floor() -> None:
    """The smallest `max_inflight_bytes` the writers honour (a smaller one is raised to it
    with a warning), and what the budget sets aside for the encoders by default."""
    from crowstream.pipeline.options import default_inflight_bytes
    from crowstream.pipeline.parts import ENCODER_BYTES, encoder_slots, min_inflight_bytes

    floors = ", ".join(f"{n} module(s) {mib(min_inflight_bytes(n))}" for n in (1, 4, 11, 32))
    print(f"smallest budget the writers honour: {floors}")
    default = default_inflight_bytes()
    print(f"  default budget {mib(default)}: {encoder_slots(default)} encoder(s) x "
          f"{mib(ENCODER_BYTES)} working memory set aside")


if __name__ == "__main__":
    sys.exit(main())
