"""The command line: `crowstream capture|modules|info|verify|report|demo` (also `python -m
crowstream`). It owns argument parsing and presentation only; every command calls the
Python API. Errors print one line (no traceback) and exit non-zero.
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys

from .errors import CrowstreamError, Interrupted, VerifyError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="crowstream", description=(
        "Turn a language model and a text corpus into an activation dataset (Parquet)."))
    commands = parser.add_subparsers(dest="command", required=True)

    c = commands.add_parser("capture", help="run MODEL over DATA and store module outputs")
    c.add_argument("model", help="hub id or local directory of a transformers model")
    c.add_argument("data", help="local .txt/.jsonl/.json/.parquet/.csv file, directory, or hub dataset id")
    c.add_argument("-m", "--module", dest="modules", action="append", required=True,
                   help="module name or glob (repeat for several); see `crowstream modules MODEL`")
    c.add_argument("-o", "--out", required=True, help="output directory")
    c.add_argument("--tokenizer", help="tokenizer id or directory (default: the model's)")
    c.add_argument("--text-field", default="text")
    c.add_argument("--split", default="train")
    c.add_argument("--max-docs", type=int)
    c.add_argument("--max-tokens", type=int, help="stop after about this many tokens fed to the model")
    c.add_argument("--sample", type=int, help="a random sample of this many documents")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--batch-size", type=int, default=32)
    c.add_argument("--max-batch-tokens", type=int, help="token budget (padded) per batch")
    c.add_argument("--context-size", type=int)
    c.add_argument("--overflow", choices=["truncate", "chunk"], default="truncate")
    c.add_argument("--dtype", choices=["float32", "float16"], default="float32")
    c.add_argument("--shard-size", type=int, help="documents per shard (the commit unit)")
    c.add_argument("--exclude-special-tokens", action="store_true")
    c.add_argument("--exclude-token-id", dest="exclude_token_ids", type=int, action="append", default=[])
    c.add_argument("--store-text", action="store_true", help="keep document text in docs/")
    c.add_argument("--device", help="e.g. cpu, cuda, cuda:1 (default: cuda if available)")
    c.add_argument("--torch-dtype", choices=["float32", "float16", "bfloat16"],
                   help="dtype to load the model in")
    c.add_argument("--trust-remote-code", action="store_true")
    c.add_argument("--overwrite", action="store_true")
    c.add_argument("--resume", action="store_true")
    c.add_argument("--no-progress", action="store_true")

    m = commands.add_parser("modules", help="list the capturable modules of MODEL")
    m.add_argument("model")
    m.add_argument("--all", action="store_true", help="also list modules without [batch, seq, d] output")

    i = commands.add_parser("info", help="summarise a capture")
    i.add_argument("out")
    i.add_argument("--json", action="store_true")

    v = commands.add_parser("verify", help="re-read every part file and check it")
    v.add_argument("out")

    r = commands.add_parser("report", help="write a self-contained HTML report of a capture")
    r.add_argument("out")
    r.add_argument("-o", "--output", default="report.html", help="HTML file to write")
    r.add_argument("--max-rows", type=int, default=None,
                   help="rows read per module at most (default 200,000; sampled above that)")

    d = commands.add_parser("demo", help="capture all-MiniLM-L6-v2 over Python's docs (offline)")
    d.add_argument("-o", "--out", default="crowstream-demo")
    d.add_argument("--docs", type=int, default=400)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="crowstream: %(message)s")
    try:
        return COMMANDS[args.command](args) or 0
    except Interrupted as error:
        command = argv if "--resume" in argv else [*argv, "--resume"]
        print(f"crowstream: {error}\nresume with: crowstream {shlex.join(command)}", file=sys.stderr)
        return 130
    except VerifyError as error:
        print(f"crowstream verify: {len(error.problems)} problem(s) in {args.out}", file=sys.stderr)
        for problem in error.problems:
            print(f"  - {problem}", file=sys.stderr)
        return 1
    except CrowstreamError as error:
        print(f"crowstream: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("crowstream: aborted; committed shards are intact, rerun with --resume",
              file=sys.stderr)
        return 130


def _capture(args) -> None:
    from .pipeline import capture

    if args.no_progress:
        import transformers

        transformers.utils.logging.disable_progress_bar()  # its "Loading weights" bar too

    run = capture(
        args.model, args.data, args.modules, args.out, tokenizer=args.tokenizer,
        text_field=args.text_field, split=args.split, context_size=args.context_size,
        overflow=args.overflow, batch_size=args.batch_size, max_batch_tokens=args.max_batch_tokens,
        max_docs=args.max_docs, max_tokens=args.max_tokens, sample=args.sample, seed=args.seed,
        dtype=args.dtype, shard_size=args.shard_size,
        exclude_special_tokens=args.exclude_special_tokens, exclude_token_ids=args.exclude_token_ids,
        store_text=args.store_text, overwrite=args.overwrite, resume=args.resume,
        device=args.device, torch_dtype=args.torch_dtype, trust_remote_code=args.trust_remote_code,
        progress=not args.no_progress)
    rows = ", ".join(f"{name}: {n:,}" for name, n in run.tokens.items())
    print(f"wrote {run.docs:,} documents to {run.path} ({rows} rows)")


def _modules(args) -> None:
    from .models import modules

    for name, kind, shape in modules(args.model):
        capturable = isinstance(shape, tuple) and len(shape) == 3
        if capturable or args.all:
            print(f"{name:<50} {kind:<28} {shape if shape is not None else '(did not run)'}")


def _info(args) -> None:
    from .readers import info

    summary = info(args.out)
    if args.json:
        print(json.dumps(summary, indent=1))
        return
    print(f"{summary['path']}: {summary['status']} (run {summary['run_id']})")
    if summary["error"]:
        print(f"  error: {summary['error']}")
    print(f"  model: {summary['model']}, context {summary['context_size']} ({summary['overflow']})")
    print(f"  documents: {summary['docs']:,} ({summary['skipped_docs']:,} skipped), tokens fed: "
          f"{summary['tokens_fed']:,}, shards: {summary['shards']} of {summary['shard_size']:,} docs")
    print(f"  on disk: {summary['bytes'] / 2**20:,.1f} MiB")
    for name, m in summary["modules"].items():
        norm = f"{m['mean_norm']:.3f}" if m["mean_norm"] is not None else "-"
        print(f"  {name}: d={m['d']} {m['dtype']}, {m['rows']:,} rows in {m['files']} file(s), "
              f"{m['bytes'] / 2**20:,.1f} MiB, mean norm {norm}")


def _verify(args) -> None:
    from .integrity import verify

    report = verify(args.out)
    print(f"{args.out}: OK ({report['parts']} parts, {report['rows']:,} rows, "
          f"{report['bytes'] / 2**20:,.1f} MiB checked)")


def _report(args) -> None:
    from .reporting import REPORT_ROWS, report

    logging.getLogger("matplotlib").setLevel(logging.WARNING)  # not its font-cache chatter
    done = report(args.out, args.output, max_rows=args.max_rows or REPORT_ROWS)
    read = sum(m["sampled_rows"] for m in done["modules"].values())
    total = sum(m["rows"] for m in done["modules"].values())
    print(f"wrote {done['path']} ({read:,} of {total:,} rows read)")


def _demo(args) -> None:
    from .demo import print_demo, run_demo

    print_demo(run_demo(args.out, docs=args.docs))


COMMANDS = {"capture": _capture, "modules": _modules, "info": _info, "verify": _verify,
            "report": _report, "demo": _demo}
