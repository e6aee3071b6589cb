"""The command line: `crowstream capture|modules|info|verify|finalize|recover|rewrite|report|demo` (also `python -m
crowstream`). It owns argument parsing and presentation only; every command calls the
Python API. Errors print one line (no traceback) and exit non-zero.
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys

from crowstream import process
from crowstream.pipeline.options import DEFAULT_CONTEXT_CAP, DEFAULT_MAX_BATCH_TOKENS
from crowstream.errors import CrowstreamError, Interrupted, VerifyError


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
    _corpus_options(c.add_argument_group("the corpus: which documents, read how"))
    _batch_options(c.add_argument_group("batches: documents per forward, context and packing"))
    _storage_options(c.add_argument_group("what is stored, and how it is written"))
    _model_options(c.add_argument_group("loading the model"))
    _run_options(c.add_argument_group("the run: a new OUT, a resume, several ranks"))

    m = commands.add_parser("modules", help="list the capturable modules of MODEL")
    m.add_argument("model")
    m.add_argument("--all", action="store_true", help="also list modules without [batch, seq, d] output")

    i = commands.add_parser("info", help="summarise a capture")
    i.add_argument("out")
    i.add_argument("--json", action="store_true")

    v = commands.add_parser("verify", help="re-read every part file and check it")
    v.add_argument("out")

    f = commands.add_parser("finalize", help="consolidate a multi-rank run once every shard "
                            "is committed")
    f.add_argument("out")

    rc = commands.add_parser("recover", help="rebuild a lost crowstream.json from commits/ "
                             "(deletes nothing)")
    rc.add_argument("out")

    r = commands.add_parser("rewrite", help="re-encode an older float16 output so DuckDB reads it")
    r.add_argument("out")
    r = commands.add_parser("report", help="write a self-contained HTML report of a capture")
    r.add_argument("out")
    r.add_argument("-o", "--output", default="report.html", help="HTML file to write")
    r.add_argument("--max-rows", type=int, default=None,
                   help="rows read per module at most (default: as many as 256 MiB of vectors)")

    d = commands.add_parser("demo", help="capture all-MiniLM-L6-v2 over Python's docs (offline)")
    d.add_argument("-o", "--out", default="crowstream-demo")
    d.add_argument("--docs", type=int, default=400)
    return parser


def _corpus_options(c) -> None:
    """The corpus: which documents, read how."""
    c.add_argument("--tokenizer", help="tokenizer id or directory (default: the model's)")
    c.add_argument("--text-field", default="text",
                   help="the field holding each document's text (default: text)")
    c.add_argument("--tokens-field", help="column of token-id lists of a pre-tokenized corpus "
                                          "(fed as they are; instead of --text-field)")
    c.add_argument("--split", default="train", help="split of a hub dataset (default: train)")
    c.add_argument("--data-config", help="config of a dataset repository, e.g. wikitext-2-raw-v1")
    c.add_argument("--data-revision", help="branch, tag or commit of a hub dataset")
    c.add_argument("--data-files", action="append",
                   help="data file(s) or glob(s) within the dataset repository (repeat for several)")
    c.add_argument("--max-docs", type=int, help="stop after this many documents")
    c.add_argument("--max-tokens", type=int, help="stop after about this many tokens fed to the model")
    c.add_argument("--sample", type=int, help="a random sample of this many documents")
    c.add_argument("--seed", type=int, default=0, help="seed of --sample (default: 0)")


def _batch_options(c) -> None:
    """Batches: documents per forward, context and packing."""
    c.add_argument("--batch-size", type=int, default=32, help="most documents per batch")
    c.add_argument("--max-batch-tokens", type=int, default=DEFAULT_MAX_BATCH_TOKENS,
                   help=f"token budget (padded) per batch (default {DEFAULT_MAX_BATCH_TOKENS})")
    c.add_argument("--context-size", type=int,
                   help="most tokens per forward row (default: the model's positions, at most "
                        f"{DEFAULT_CONTEXT_CAP})")
    c.add_argument("--overflow", choices=["truncate", "chunk"], default="truncate",
                   help="a document longer than the context: truncate it, or chunk it into "
                        "consecutive windows, each its own forward (default: truncate)")
    c.add_argument("--packing", choices=["off", "auto"], default="auto",
                   help="auto: several documents per row, each attending only to itself "
                        "(GPT-2 and Llama); padded batches for other models")
    c.add_argument("--exclude-special-tokens", action="store_true",
                   help="drop rows of the tokenizer's special tokens ([CLS], [SEP], BOS, ...)")
    c.add_argument("--exclude-token-id", dest="exclude_token_ids", type=int, action="append",
                   default=[], help="drop rows of this token id (repeat for several)")


def _storage_options(c) -> None:
    """What is stored, and how it is written."""
    c.add_argument("--dtype", choices=["float32", "float16"], default="float32",
                   help="dtype of the stored vectors (default: float32)")
    c.add_argument("--float16-overflow", choices=["error", "clamp"], default="error",
                   help="values beyond float16's range: stop with an error, or clamp and "
                        "count them")
    c.add_argument("--max-inflight-bytes", type=_byte_size, metavar="BYTES",
                   help="bound on bytes between the forward and the disk, e.g. 512M or 4G "
                        "(default: min(2 GiB, 10%% of RAM))")
    c.add_argument("--compression", choices=("zstd", "lz4", "none"), default="zstd",
                   help="codec of the part files (default: zstd, level 1; see "
                        "docs/performance.md)")
    c.add_argument("--encoder-threads", type=int, metavar="N",
                   help="threads encoding part files, shared by all modules; the output is "
                        "the same whatever N (default: one per core)")
    c.add_argument("--shard-size", type=int,
                   help="documents per shard, the commit unit (default: enough for ~256k tokens)")
    c.add_argument("--store-text", action="store_true", help="keep document text in docs/")


def _model_options(c) -> None:
    """Loading the model."""
    c.add_argument("--device", help="e.g. cpu, cuda, cuda:1 (default: cuda if available)")
    c.add_argument("--torch-dtype", choices=["float32", "float16", "bfloat16"],
                   help="dtype to load the model in")
    c.add_argument("--revision", help="hub model revision: branch, tag or commit (e.g. step1000)")
    c.add_argument("--trust-remote-code", action="store_true",
                   help="run a hub model's own code (transformers' trust_remote_code)")


def _run_options(c) -> None:
    """The run: a new OUT, a resume, several ranks."""
    c.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    c.add_argument("--resume", action="store_true",
                   help="continue the interrupted run in OUT (same command otherwise)")
    c.add_argument("--takeover", action="store_true",
                   help="with a bucket OUT: take over the run's lease at once (you assert that "
                        "the writer holding it is dead)")
    c.add_argument("--spool-dir", default=None,
                   help="with a bucket OUT: the local directory for the spool (default: the "
                        "system temp directory)")
    c.add_argument("--no-progress", action="store_true", help="no progress bar")
    c.add_argument("--rank", type=int, help="this process's rank of several writing one run "
                   "(default: env RANK, as torchrun sets it); it captures shards k with "
                   "k mod world-size == rank")
    c.add_argument("--world-size", type=int, help="how many ranks write the run (default: env "
                   "WORLD_SIZE, else 1)")


_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def _byte_size(text: str) -> int:
    """'512M', '4G', '2GiB', '1048576' -> bytes (binary units)."""
    value = text.strip().upper().removesuffix("IB").removesuffix("B")
    unit = value[-1:] if value[-1:] in _UNITS else ""
    try:
        number = float(value[:len(value) - len(unit)])
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size; use e.g. 512M or 4G") from None
    if number <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be positive")
    return int(number * _UNITS[unit])


def main(argv: list[str] | None = None) -> int:
    process.prepare_process()
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    _configure_logging()
    try:
        return COMMANDS[args.command](args) or 0
    except Interrupted as error:
        from crowstream.format.storage import is_url, public

        command = argv if "--resume" in argv else [*argv, "--resume"]
        command = [public(a) if is_url(a) else a for a in command]  # no credentials shown
        print(f"crowstream: {error}\nresume with: crowstream {shlex.join(command)}", file=sys.stderr)
        return 130
    except VerifyError as error:
        from crowstream.format.storage import public

        print(f"crowstream verify: {len(error.problems)} problem(s) in {public(args.out)}",
              file=sys.stderr)
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


def _configure_logging() -> None:
    """crowstream's own logger only: other libraries' records are not ours to print (they
    keep their own defaults, so a third-party warning never appears as crowstream's)."""
    log = logging.getLogger("crowstream")
    if not any(getattr(h, "crowstream_cli", False) for h in log.handlers):
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("crowstream: %(message)s"))
        handler.crowstream_cli = True
        log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False


def _third_party_progress(enabled: bool) -> None:
    """transformers' and datasets' progress bars show only when crowstream's does."""
    if enabled:
        return
    import datasets
    import transformers

    transformers.utils.logging.disable_progress_bar()  # its "Loading weights" bar too
    datasets.disable_progress_bars()


def _capture(args) -> None:
    from crowstream.pipeline.run import capture

    _third_party_progress(not args.no_progress)

    run = capture(
        args.model, args.data, args.modules, args.out, tokenizer=args.tokenizer,
        text_field=args.text_field, tokens_field=args.tokens_field, split=args.split, context_size=args.context_size,
        overflow=args.overflow, packing=args.packing, batch_size=args.batch_size, max_batch_tokens=args.max_batch_tokens,
        max_docs=args.max_docs, max_tokens=args.max_tokens, sample=args.sample, seed=args.seed,
        dtype=args.dtype, float16_overflow=args.float16_overflow,
        max_inflight_bytes=args.max_inflight_bytes, shard_size=args.shard_size,
        encoder_threads=args.encoder_threads, compression=args.compression,
        exclude_special_tokens=args.exclude_special_tokens, exclude_token_ids=args.exclude_token_ids,
        store_text=args.store_text, overwrite=args.overwrite, resume=args.resume,
        takeover=args.takeover, spool_dir=args.spool_dir,
        device=args.device, torch_dtype=args.torch_dtype, revision=args.revision,
        trust_remote_code=args.trust_remote_code,
        progress=not args.no_progress, rank=args.rank, world_size=args.world_size,
        data_config=args.data_config, data_revision=args.data_revision,
        data_files=args.data_files)
    rows = ", ".join(f"{name}: {n:,}" for name, n in run.tokens.items())
    status = "" if run.manifest.status == "complete" else \
        f" so far; the run is {run.manifest.status}: `crowstream finalize {run.path}` once every rank is done"
    print(f"wrote {run.docs:,} documents to {run.path} ({rows} rows){status}")


def _finalize(args) -> None:
    from crowstream.pipeline.ranks import finalize

    manifest = finalize(args.out)
    print(f"{args.out}: complete ({len(manifest.shards)} shards, {manifest.counts.docs:,} "
          f"documents)")


def _recover(args) -> None:
    from crowstream.format.rebuild import recover
    from crowstream.format.storage import public

    done = recover(args.out)
    shown = public(args.out) if isinstance(args.out, str) else args.out
    print(f"{shown}: rebuilt crowstream.json from {done['shards']} committed shard(s); the run "
          "is interrupted: resume it with the same call and --resume")


def _modules(args) -> None:
    from crowstream.pipeline.models import modules

    for name, kind, shape in modules(args.model):
        capturable = isinstance(shape, tuple) and len(shape) == 3
        if capturable or args.all:
            print(f"{name:<50} {kind:<28} {shape if shape is not None else '(did not run)'}")


def _info(args) -> None:
    from crowstream.reading.readers import info

    summary = info(args.out)
    if args.json:
        print(json.dumps(summary, indent=1))
        return
    old = ", format 1: crowstream 0.1" if summary["format_version"] == 1 else ""
    print(f"{summary['path']}: {summary['status']} (run {summary['run_id']}{old})")
    if summary["error"]:
        print(f"  error: {summary['error']}")
    print(f"  model: {summary['model']}, context {summary['context_size']} ({summary['overflow']})")
    print(f"  documents: {summary['docs']:,} ({summary['skipped_docs']:,} skipped), tokens fed: "
          f"{summary['tokens_fed']:,}, shards: {summary['shards']} of {summary['shard_size']:,} docs")
    print(f"  on disk: {summary['bytes'] / 2**20:,.1f} MiB (format {summary['format_version']})")
    for name, m in summary["modules"].items():
        norm = f"{m['mean_norm']:.3f}" if m["mean_norm"] is not None else "-"
        nonfinite = f", {m['nonfinite']:,} values NaN or infinite" if m["nonfinite"] else ""
        print(f"  {name}: d={m['d']} {m['dtype']}, {m['rows']:,} rows in {m['files']} file(s), "
              f"{m['bytes'] / 2**20:,.1f} MiB, mean norm {norm}{nonfinite}")
    for note in summary["notes"]:
        print(f"  note: {note}")
    for shard in summary["partly_visible"]:
        print(f"  {shard}")


def _verify(args) -> None:
    from crowstream.format.integrity import verify

    from crowstream.format.storage import public

    report = verify(args.out)
    print(f"{public(args.out)}: OK ({report['parts']} parts, {report['rows']:,} rows, "
          f"{report['bytes'] / 2**20:,.1f} MiB checked)")
    for note in report["notes"]:
        print(f"  note: {note}")


def _rewrite(args) -> None:
    from crowstream.format.reencode import rewrite

    done = rewrite(args.out)
    print(f"{args.out}: rewrote {len(done)} part file(s)" if done else
          f"{args.out}: nothing to rewrite (no float16 part file uses BYTE_STREAM_SPLIT)")


def _report(args) -> None:
    from crowstream.reading.reporting import report

    logging.getLogger("matplotlib").setLevel(logging.WARNING)  # not its font-cache chatter
    limit = {} if args.max_rows is None else {"max_rows": args.max_rows}  # 0 is refused there
    done = report(args.out, args.output, **limit)
    read = sum(m["sampled_rows"] for m in done["modules"].values())
    total = sum(m["rows"] for m in done["modules"].values())
    print(f"wrote {done['path']} ({read:,} of {total:,} rows read)")


def _demo(args) -> None:
    from crowstream.demo import print_demo, run_demo

    print_demo(run_demo(args.out, docs=args.docs))


COMMANDS = {"capture": _capture, "modules": _modules, "info": _info, "verify": _verify,
            "finalize": _finalize, "recover": _recover, "rewrite": _rewrite, "report": _report, "demo": _demo}
