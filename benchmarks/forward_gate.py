"""The CPU forward gate: a capture with its writers held back while a forward runs
(`threads.ForwardGate`, on when the forward's threads take every core) against the same
capture with them running beside it, in alternating rounds in one process.

    python benchmarks/forward_gate.py              # GPT-2-small shape, 250 docs, 6 rounds
    python benchmarks/forward_gate.py --tiny       # CI smoke run (numbers meaningless)

Prints each round's wall and CPU seconds, the medians, and how many rounds the gate won,
and checks that both captures wrote the same part files (sha256).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def _parts(run) -> list:
    return sorted((p.path, p.sha256) for s in run.manifest.shards for p in s.parts)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--docs", type=int, default=250)
    parser.add_argument("--tmp", default=None, help="directory for the outputs")
    parser.add_argument("--tiny", action="store_true", help="CI smoke run")
    args = parser.parse_args(argv)
    if args.tiny:
        args.rounds, args.docs = 2, 24

    import torch

    import throughput
    from crowstream.pipeline import tracing

    model, tokenizer = throughput.build_model(throughput.TINY if args.tiny else throughput.SMALL)
    docs = throughput.documents(args.docs)
    modules = ["transformer.h.0", "transformer.h.1"] if args.tiny else ["transformer.h.2",
                                                                       "transformer.h.5"]
    cpu = torch.device("cpu")
    work = tempfile.mkdtemp(prefix="crowstream-gate-", dir=args.tmp)
    found, parts = {True: [], False: []}, {}
    always = tracing._forward_takes_every_core
    try:
        throughput.run_capture(model, tokenizer, docs[:8], modules, os.path.join(work, "warm"),
                               batch_size=32, dtype="float32", device=cpu)
        for r in range(args.rounds):
            for gated in ((True, False) if r % 2 == 0 else (False, True)):
                tracing._forward_takes_every_core = lambda device, on=gated: on
                out = os.path.join(work, f"round{r}-{gated}")
                record = throughput.run_capture(model, tokenizer, docs, modules, out,
                                                batch_size=32, dtype="float32", device=cpu)
                found[gated].append((record["seconds"], record["cpu"]))
                parts.setdefault(gated, _parts(record["run"]))
                print(f"round {r} {'gated' if gated else 'beside'}: {record['seconds']:.2f} s, "
                      f"{record['cpu']:.2f} CPU-s", flush=True)
                shutil.rmtree(out)
    finally:
        tracing._forward_takes_every_core = always
        shutil.rmtree(work, ignore_errors=True)
    for gated, runs in found.items():
        print(f"{'gated' if gated else 'beside'}: median {statistics.median(w for w, _ in runs):.2f} s,"
              f" {statistics.median(c for _, c in runs):.2f} CPU-s")
    won = sum(g[0] < b[0] for g, b in zip(found[True], found[False]))
    print(f"torch threads {torch.get_num_threads()} on {os.cpu_count()} CPUs; the gate won "
          f"{won} of {args.rounds} rounds; same part files: {parts[True] == parts[False]}")
    return 0 if parts[True] == parts[False] else 1


if __name__ == "__main__":
    sys.exit(main())
