"""Compression chosen by measurement (issue #16): zstd (level 1), lz4 and none on real
activations.

    python benchmarks/compression.py           # MiniLM (demo weights) + tiny GPT-2, ~2 min
    python benchmarks/compression.py --tiny    # CI: fewer rows, seconds

Activations: the demo's all-MiniLM-L6-v2 (`encoder.layer.2`, `encoder.layer.5`, d = 384)
when its package is installed, and a GPT-2 built here (random weights, d = 256; random
weights compress worse than trained ones, so it is the pessimistic case), over paragraphs
of Python's docs, float32 and float16. Each codec writes the same rows through
crowstream's own `PartWriter` (its row groups, BYTE_STREAM_SPLIT on float32, checksums)
to /dev/shm, so the disk is not measured, only the encoder.

Reported per codec: bytes per row on disk, encode CPU-seconds per GB of payload (this
thread, `time.thread_time`, medians of interleaved repeats), and the rows/s that codec
allows on an 8-core writer at 0.5 GB/s (a network file system or bucket) and 3 GB/s (a
local NVMe) of write bandwidth: min(8 cores / CPU-s per row, bandwidth / bytes per row).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

CODECS = ("zstd", "lz4", "none")
CORES = 8
BANDWIDTHS = (0.5e9, 3e9)
TIE = 0.02


def activations(tiny: bool) -> dict:
    """name -> [N, d] float32 activations of real text."""
    import crowstream as cs
    from crowstream.demo import python_doc_paragraphs

    texts = python_doc_paragraphs(60 if tiny else 600)
    found = {}
    with tempfile.TemporaryDirectory(dir="/dev/shm") as tmp:
        models = [("gpt2-random", *_gpt2(tmp), ["transformer.h.1"])]
        try:
            from transformers import AutoModel, AutoTokenizer

            from crowstream.demo import DEMO_MODULES, demo_model_dir

            path = demo_model_dir()
            models.insert(0, ("minilm", AutoModel.from_pretrained(path).eval(),
                              AutoTokenizer.from_pretrained(path), DEMO_MODULES))
        except Exception as error:  # the demo extra is optional: say so, measure the rest
            print(f"MiniLM skipped: {error}")
        for label, model, tokenizer, modules in models:
            out = os.path.join(tmp, label)
            cs.capture(model, texts, modules, out, tokenizer=tokenizer, progress=False)
            for module in modules:
                vectors = cs.load(out, module).data.column("vector").combine_chunks()
                found[f"{label} {module}"] = vectors.flatten().to_numpy().astype(
                    np.float32).reshape(len(vectors), -1)
    return found


def _gpt2(tmp: str):
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                    "tests"))
    from conftest import build_tiny_gpt2

    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    _, tokenizer = build_tiny_gpt2(os.path.join(tmp, "tok"), n_layer=1)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=256, n_head=4, n_positions=256,
                                       vocab_size=len(tokenizer), bos_token_id=tokenizer.eos_token_id,
                                       eos_token_id=tokenizer.eos_token_id)).eval()
    return model, tokenizer


def encode(vectors: np.ndarray, dtype: str, codec: str, path: str) -> tuple[float, int]:
    """-> (thread CPU seconds, file bytes) of writing `vectors` as one part file."""
    from crowstream.pipeline.flatten import to_record_batch
    from crowstream.pipeline.parts import PartWriter
    from crowstream.schemas import row_schema

    rows = vectors.astype(dtype)
    ids = np.arange(len(rows))
    batch = to_record_batch(ids, ids.astype(np.int32), ids.astype(np.int32), rows, dtype)
    start = time.thread_time()
    part = PartWriter(path, row_schema(rows.shape[1], dtype), compression=codec)
    part.write(batch)
    info = part.close()
    cpu = time.thread_time() - start
    os.remove(path)
    return cpu, info.bytes


def measure(vectors, dtype, repeats: int) -> dict:
    """codec -> (bytes per row, CPU-s per GB): interleaved repeats, medians."""
    seconds = {codec: [] for codec in CODECS}
    size = {}
    with tempfile.TemporaryDirectory(dir="/dev/shm") as tmp:
        for _ in range(repeats):
            for codec in CODECS:
                cpu, size[codec] = encode(vectors, dtype, codec, os.path.join(tmp, "p.parquet"))
                seconds[codec].append(cpu)
    payload = vectors.size * np.dtype(dtype).itemsize / 1e9
    return {codec: (size[codec] / len(vectors), statistics.median(seconds[codec]) / payload)
            for codec in CODECS}


def allowed_rows(bytes_per_row: float, cpu_per_gb: float, payload_row: int) -> list[float]:
    """Rows/s on CORES cores at each of BANDWIDTHS."""
    cpu_rows = CORES / (cpu_per_gb * payload_row / 1e9)
    return [min(cpu_rows, bandwidth / bytes_per_row) for bandwidth in BANDWIDTHS]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--tmp", default=None, help="unused (the encoder writes to /dev/shm)")
    parser.add_argument("--repeats", type=int, default=None, help="interleaved (default 3; 1 with --tiny)")
    args = parser.parse_args(argv)
    args.repeats = args.repeats or (1 if args.tiny else 3)
    print(f"{'activations':<32} {'dtype':<8} {'codec':<5} {'bytes/row':>10} {'raw':>7} "
          f"{'CPU-s/GB':>9} {'rows/s @0.5GB/s':>16} {'rows/s @3GB/s':>14}")
    shares = {codec: [] for codec in CODECS}  # rows/s as a share of the best codec's
    sizes = {codec: [] for codec in CODECS}   # bytes per row as a share of the raw row
    for name, vectors in activations(args.tiny).items():
        for dtype in ("float32", "float16"):
            payload_row = vectors.shape[1] * np.dtype(dtype).itemsize
            found = {codec: (per_row, cpu, allowed_rows(per_row, cpu, payload_row))
                     for codec, (per_row, cpu) in measure(vectors, dtype, args.repeats).items()}
            for i in range(len(BANDWIDTHS)):
                best = max(rates[i] for _, _, rates in found.values())
                for codec, (_, _, rates) in found.items():
                    shares[codec].append(rates[i] / best)
            for codec, (per_row, cpu, rates) in found.items():
                sizes[codec].append(per_row / payload_row)
                print(f"{name:<32} {dtype:<8} {codec:<5} {per_row:>10.1f} {payload_row:>7} "
                      f"{cpu:>9.2f} {rates[0]:>16,.0f} {rates[1]:>14,.0f}")
    score = {codec: float(np.exp(np.mean(np.log(v)))) for codec, v in shares.items()}
    print("rows/s as a share of the best codec's, geometric mean over activations, dtypes and "
          "both bandwidths: " + ", ".join(f"{c} {v:.3f}" for c, v in score.items()))
    size = {codec: float(np.mean(v)) for codec, v in sizes.items()}
    print("bytes per row as a share of the raw vector, mean: "
          + ", ".join(f"{c} {v:.3f}" for c, v in size.items()))
    # rows/s within TIE of the best count as equal (this host's noise is larger); among
    # those, the smallest output wins
    close = [codec for codec in CODECS if score[codec] >= (1 - TIE) * max(score.values())]
    print(f"choice: {min(close, key=size.get)} (rows/s within {TIE:.0%} of the best: "
          f"{', '.join(close)}; then the fewest bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
