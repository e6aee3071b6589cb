"""The small tables of a run. It owns the docs part of each shard (`docs_table`), the
vocabulary (`write_vocab`) and the tokenizer's own files (`write_tokenizer`).
"""

from __future__ import annotations

import os
import secrets

import numpy as np
import pyarrow as pa

from crowstream.format.files import fsync_dir
from crowstream.format.layout import TMP_DIR, TOKENIZER_DIR, VOCAB_NAME
from crowstream.schemas import docs_schema, vocab_schema

from .parts import write_table


def docs_table(end) -> pa.Table:
    texts = end.texts if end.texts is not None else [None] * len(end.doc_ids)
    offsets = np.concatenate([[0], np.cumsum(end.n_tokens, dtype=np.int32)]).astype(np.int32)
    tokens = pa.ListArray.from_arrays(pa.array(offsets), pa.array(end.token_ids, pa.int32()))
    return pa.table({"doc_id": pa.array(end.doc_ids, pa.int64()),
                     "n_tokens": pa.array(end.n_tokens, pa.int32()),
                     "text": pa.array(texts, pa.string()),
                     "tokens": tokens.cast(docs_schema().field("tokens").type)},
                    schema=docs_schema())


def write_vocab(out: str, tokenizer) -> None:
    """vocab.parquet: every token id with its decoded text and whether it is special."""
    size = len(tokenizer)
    special = set(tokenizer.all_special_ids)
    texts = decode_each(tokenizer, size)
    table = pa.table({"token": pa.array(np.arange(size, dtype=np.int32)),
                      "text": pa.array(texts, pa.string()),
                      "special": pa.array([i in special for i in range(size)])},
                     schema=vocab_schema())
    # a name of its own: the ranks of a run start side by side and each writes it
    tmp = os.path.join(out, TMP_DIR, f"{VOCAB_NAME}.{secrets.token_hex(8)}.tmp")
    write_table(tmp, table)
    os.replace(tmp, os.path.join(out, VOCAB_NAME))
    fsync_dir(out)


def decode_each(tokenizer, size: int) -> list[str]:
    """The text of each id below `size`, as `tokenizer.batch_decode` gives it: straight
    from the `tokenizers` backend in one call where the tokenizer cleans up no spaces
    (0.6 s of Python per run for a 50k vocabulary otherwise), else through it."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    ids = [[i] for i in range(size)]
    if backend is None or getattr(tokenizer, "clean_up_tokenization_spaces", True):
        return tokenizer.batch_decode(ids)
    return backend.decode_batch(ids, skip_special_tokens=False)


def write_tokenizer(out: str, tokenizer) -> None:
    """OUT/tokenizer/: the tokenizer's own files (save_pretrained), so the docs table's
    token ids decode exactly (byte-level BPE, WordPiece) without the model directory."""
    path = os.path.join(out, TOKENIZER_DIR)
    tokenizer.save_pretrained(path)
    for name in os.listdir(path):  # durable before the manifest that points at them
        if os.path.isfile(os.path.join(path, name)):
            with open(os.path.join(path, name), "rb+") as f:
                os.fsync(f.fileno())
    fsync_dir(path)
    fsync_dir(out)
