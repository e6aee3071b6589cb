"""What one row of a source becomes: a document's text (`text_field`) or, for a
pre-tokenized corpus (`tokens_field`), its token ids as a 1-D int64 array, fed to the model
as they are; and a crowstream output given as a pre-tokenized corpus (its `docs/` table).
`sources.py` reads the rows.

Policy for bad texts: `None` is skipped and counted (the manifest's `skipped_docs`);
an empty string is a document with zero tokens; any other non-string is an error,
because it almost always means the wrong `text_field`. The same for token ids: `None` is
skipped, an empty list is a zero-token document, anything but a flat list of non-negative
integers is an error.
"""

from __future__ import annotations

import hashlib
import os

import numpy as np

from crowstream.errors import DataError


def docs_of_output(data):
    """A crowstream output given as a pre-tokenized corpus: read its `docs/` table."""
    if isinstance(data, (str, os.PathLike)) and os.path.isfile(
            os.path.join(os.fspath(data), "crowstream.json")):
        return os.path.join(os.fspath(data), "docs")
    return data


def check_not_text_file(path: str) -> None:
    """A pre-tokenized corpus cannot be a .txt file (it has no column of token ids)."""
    if os.path.isfile(path) and path.lower().endswith(".txt"):
        raise DataError(f"{path!r} is a text file: it has no column of token ids. Drop "
                        "tokens_field (--tokens-field) to tokenize it, or pass a .parquet, "
                        ".jsonl or datasets corpus with a column of token-id lists.")


def ids_digest(column):
    """A sha256 over a column of token-id lists (`None` rows included), in order."""
    digest = hashlib.sha256()
    for ids in column:
        digest.update(b"-" if ids is None else np.asarray(ids, dtype=np.int64).tobytes() + b";")
    return digest


def field_words(tokens: bool) -> tuple[str, str]:
    """How an error names the column option: ("text field", "text_field=") or the tokens'."""
    return ("tokens field", "tokens_field=") if tokens else ("text field", "text_field=")


def text_of(item, text_field: str, index: int) -> str | None:
    if isinstance(item, dict):
        if text_field not in item:
            raise DataError(f"document {index} has no field {text_field!r}; available fields: "
                            f"{', '.join(map(str, item))}. Pass text_field= (CLI: --text-field).")
        item = item[text_field]
    if item is None or isinstance(item, str):
        return item
    raise DataError(f"document {index} has type {type(item).__name__}, not str "
                    f"(value {str(item)[:60]!r}); check text_field (now {text_field!r}).")


def ids_of(item, tokens_field: str, index: int) -> np.ndarray | None:
    """A document's token ids as a 1-D int64 array (None: a skipped row)."""
    if isinstance(item, dict):
        if tokens_field not in item:
            raise DataError(f"document {index} has no field {tokens_field!r}; available fields: "
                            f"{', '.join(map(str, item))}. Pass tokens_field= (CLI: --tokens-field).")
        item = item[tokens_field]
    if item is None:
        return None
    ids = np.asarray(item) if isinstance(item, (list, tuple, np.ndarray)) else None
    if ids is not None and ids.size == 0:
        return np.zeros(0, dtype=np.int64)
    if ids is None or ids.ndim != 1 or ids.dtype.kind not in "iu" or ids.min() < 0:
        raise DataError(f"document {index}: tokens field {tokens_field!r} holds "
                        f"{str(item)[:60]!r}, not a list of token ids (non-negative integers); "
                        "check tokens_field, or drop it to tokenize a text column.")
    return ids.astype(np.int64, copy=False)
