"""Stage 2, tokenize and batch. It owns turning `(doc_id, text)` into model-ready
`Batch`es: fast batched tokenization, truncation or chunking to `context_size`,
length-sorted batching within a window of documents (padding wasted ~half of all compute
on real text; sorting within ~1k documents removes nearly all of it), an optional token
budget per batch, and the keep-mask that drops padding and, if asked, special tokens.

Shards are the commit unit: a run of `shard_size` source rows. A sorting window never
straddles a shard, so a resumed run rebuilds exactly the batches an uninterrupted run
would. Padding is on the right, with the attention mask passed to the model, so causal
models see the positions they would see unpadded.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import numpy as np
import torch

from crowstream.errors import DataError
from crowstream.pipeline.options import FIRST_WINDOW_DOCS, SORT_WINDOW_DOCS, CaptureConfig
from crowstream.pipeline.threads import prefetch

# Tokens read and tokenized ahead of the forward (on the reader thread): a few windows of
# documents, so the next window is ready before the current one's batches are done (with a
# prefetch of 2 batches the forward waited for every window). ~16 bytes per token queued.
PREFETCH_TOKENS = 1 << 20


@dataclasses.dataclass
class Batch:
    """One forward pass. Row arrays describe the kept positions, in flat `[B*T]` order."""

    input_ids: torch.Tensor       # [B, T] int64, right-padded
    attention_mask: torch.Tensor  # [B, T] int64
    keep_index: torch.Tensor      # [N] int64, flat indices into B*T of rows to store
    doc_ids: np.ndarray           # [N] int64
    positions: np.ndarray         # [N] int32, absolute token index in the document
    tokens: np.ndarray            # [N] int32
    piece_doc_ids: np.ndarray     # [B] int64, the document of each batch row
    piece_starts: np.ndarray      # [B] int64, absolute position of each row's first token
    shard: int = 0                # the shard this batch belongs to
    # packed batches (several documents per row, see packing.py); None otherwise
    segments: torch.Tensor | None = None      # [B, T] int64, the piece of each token in its row
    position_ids: torch.Tensor | None = None  # [B, T] int64, restarting at 0 per piece
    packed_rows: list | None = None           # [B] lists of (doc_id, start, ids) pieces

    @property
    def n_pieces(self) -> int:
        """Pieces (documents or chunks) in this batch (several per row when packed)."""
        return len(self.piece_starts)

    @property
    def padded_tokens(self) -> int:
        """B*T: what a forward costs in memory, padding included."""
        return self.input_ids.numel()

    @property
    def real_tokens(self) -> int:
        return int(self.attention_mask.sum())

    def pin_memory(self) -> Batch:
        """Page-locked copies of the tensors that go to the GPU, so the copies can be
        asynchronous: a packed batch sends its segment ids (its mask is built from them on
        the GPU, `packing.packed_mask`), not its attention mask."""
        travels = ({"attention_mask": self.attention_mask} if self.segments is None
                   else {"position_ids": self.position_ids, "segments": self.segments})
        travels |= {"input_ids": self.input_ids, "keep_index": self.keep_index}
        return dataclasses.replace(self, **{k: t.pin_memory() for k, t in travels.items()})

    def split(self) -> tuple[Batch, Batch]:
        """Two half-size batches with the same rows (used to back off on OOM)."""
        if self.packed_rows is not None:
            from .packing import split_packed
            return split_packed(self)
        half = self.n_pieces // 2
        lengths = self.attention_mask.sum(1).numpy()
        ids = self.input_ids.numpy()
        keep = np.zeros(ids.size, dtype=bool)
        keep[self.keep_index.numpy()] = True
        keep = keep.reshape(ids.shape)
        halves = []
        for rows in (slice(0, half), slice(half, self.n_pieces)):
            width = int(lengths[rows].max())
            halves.append(dataclasses.replace(
                _assemble(ids[rows, :width], lengths[rows], keep[rows, :width],
                          self.piece_doc_ids[rows], self.piece_starts[rows]), shard=self.shard))
        return halves[0], halves[1]


@dataclasses.dataclass
class ShardEnd:
    """Marks the end of shard `index`: every batch of it has been yielded."""

    index: int
    source_start: int           # source rows consumed before this shard
    source_end: int             # ... and after it
    doc_ids: np.ndarray         # [D] int64, documents with text (None rows are skipped)
    n_tokens: np.ndarray        # [D] int32, tokens fed to the model per document
    token_ids: np.ndarray       # [sum(n_tokens)] int32, each document's ids in turn, as fed
    texts: list[str] | None     # kept only with store_text
    skipped: int                # rows whose text was None
    last: bool                  # max_tokens reached: no shard follows


class Tokenizing:
    """Turns documents into token-id arrays under one config: texts through the tokenizer,
    or with `tokens_field` the corpus's own ids, fed as they are (only truncated to
    `context_size` under overflow="truncate"). Holds the ids to exclude."""

    def __init__(self, tokenizer, config: CaptureConfig, *, pack: bool = False):
        self.tokenizer = tokenizer
        self.config = config
        self.pack = pack  # several documents per row (packing.py), for models that allow it
        excluded = set(config.exclude_token_ids)
        if config.exclude_special_tokens:
            excluded |= set(tokenizer.all_special_ids)
        self.excluded = np.array(sorted(excluded), dtype=np.int64)
        pad = tokenizer.pad_token_id
        if pad is None:  # e.g. GPT-2: any valid id works, the attention mask hides it
            pad = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
        self.pad_id = int(pad)
        self.vocab_size = len(tokenizer)
        self._ahead: dict[int, np.ndarray] = {}  # doc_id -> ids encoded early (`remember`)

    def remember(self, doc_ids: list[int], encoded: list[np.ndarray]) -> None:
        """Keep documents' ids encoded ahead of the stream (the shard-size estimate's), so
        `encode` hands them out once instead of tokenizing those documents again."""
        self._ahead.update(zip(doc_ids, encoded))

    def encode(self, documents: list, doc_ids: list[int] | None = None) -> list[np.ndarray]:
        """-> one int64 array of ids per document (texts, or id arrays with tokens_field)."""
        if not self._ahead or doc_ids is None:
            return self._encode(documents, doc_ids)
        found = [self._ahead.pop(doc_id, None) for doc_id in doc_ids]
        todo = [i for i, ids in enumerate(found) if ids is None]
        if todo:
            fresh = self._encode([documents[i] for i in todo], [doc_ids[i] for i in todo])
            for i, ids in zip(todo, fresh):
                found[i] = ids
        return found

    def _encode(self, documents: list, doc_ids: list[int] | None) -> list[np.ndarray]:
        if not documents:
            return []
        truncate = self.config.overflow == "truncate"
        if self.config.tokens_field is not None:
            self._check_ids(documents, doc_ids)
            size = self.config.context_size
            return [ids[:size] for ids in documents] if truncate else list(documents)
        backend = _plain_backend(self.tokenizer)
        if backend is not None:  # the same ids without transformers' per-call work
            size = self.config.context_size if truncate else None
            return [np.array(e.ids[:size], dtype=np.int64)
                    for e in backend.encode_batch_fast(documents, add_special_tokens=True)]
        encoded = self.tokenizer(
            documents, add_special_tokens=True, truncation=truncate,
            max_length=self.config.context_size if truncate else None,
            return_attention_mask=False, return_token_type_ids=False, verbose=False,
        )["input_ids"]
        return [np.array(ids, dtype=np.int64) for ids in encoded]

    def _check_ids(self, documents: list[np.ndarray], doc_ids) -> None:
        for i, ids in enumerate(documents):
            if ids.size and int(ids.max()) >= self.vocab_size:
                which = f"document {doc_ids[i]}" if doc_ids is not None else "a document"
                raise DataError(
                    f"{which} holds token id {int(ids.max())}, beyond the tokenizer's "
                    f"{self.vocab_size} ids: the corpus was tokenized with another tokenizer. "
                    "Pass the tokenizer it was made with (tokenizer=), or capture from text.")

    def pieces(self, doc_ids: list[int], encoded: list[np.ndarray]):
        """-> list of (doc_id, start position, ids) windows of at most context_size."""
        size = self.config.context_size
        out = []
        for doc_id, ids in zip(doc_ids, encoded):
            for start in range(0, len(ids), size):
                out.append((doc_id, start, ids[start:start + size]))
        return out


def _plain_backend(tokenizer):
    """The `tokenizers.Tokenizer` under a fast tokenizer whose output is just its encoding:
    no special tokens added and truncation from the right (so truncating is slicing), no
    truncation or padding set on it; else None. Its `encode_batch_fast` (no offsets, no Python-side conversions) gave
    the same ids as the tokenizer's own call for ~40% less CPU on the ceiling corpus."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or not hasattr(backend, "encode_batch_fast"):
        return None
    if backend.truncation is not None or backend.padding is not None:
        return None
    if (tokenizer.num_special_tokens_to_add(pair=False) != 0
            or getattr(tokenizer, "truncation_side", "right") != "right"):
        return None
    return backend


@dataclasses.dataclass
class _Window:
    """Source rows of one shard, tokenized (on the reader thread): the shard's first
    FIRST_WINDOW_DOCS, then SORT_WINDOW_DOCS at a time (`window_bounds`)."""

    shard: int
    rows: list                  # (doc_id, text or ids or None) as read
    doc_ids: list[int]          # rows that are documents (None rows dropped)
    documents: list             # their texts or ids
    encoded: list[np.ndarray]   # their ids as fed
    last: bool                  # the shard's last window

    @property
    def tokens(self) -> int:
        return sum(len(ids) for ids in self.encoded)


def _windows(shards, tokenizing: Tokenizing) -> Iterator[_Window]:
    """Read and tokenize each shard's windows in turn (runs on the reader thread)."""
    for index, block in shards:
        for start, end in window_bounds(len(block)):  # a window never crosses the shard
            window = block[start:end]
            doc_ids = [d for d, doc in window if doc is not None]
            documents = [doc for _, doc in window if doc is not None]
            yield _Window(index, window, doc_ids, documents, tokenizing.encode(documents, doc_ids),
                          last=end == len(block))


def window_bounds(rows: int) -> list[tuple[int, int]]:
    """(start, end) of the sorting windows of a shard of `rows` source rows: the first
    FIRST_WINDOW_DOCS rows, then SORT_WINDOW_DOCS at a time. A function of the shard alone,
    so a resumed run rebuilds the same batches."""
    cuts = [0, *range(min(FIRST_WINDOW_DOCS, rows), rows, SORT_WINDOW_DOCS), rows]
    return [(start, end) for start, end in zip(cuts, cuts[1:]) if end > start]


def shard_stream(shards, tokenizing: Tokenizing, *, shard_size: int, tokens_before: int,
                 on_end=None) -> Iterator[Batch | ShardEnd]:
    """Batches of each `(index, rows)` shard in turn, each shard followed by its
    `ShardEnd`. Shard k starts at source row k * shard_size. Reading and tokenizing run
    on a reader thread up to PREFETCH_TOKENS ahead, so the next window is ready when the
    forward finishes this one's batches. `on_end()` is called after the last shard's
    `ShardEnd` when the shards ran out (not when max_tokens stopped them)."""
    config = tokenizing.config
    tokens_fed = tokens_before
    windows = prefetch(_windows(shards, tokenizing), PREFETCH_TOKENS, "crowstream-reader",
                       cost=lambda w: w.tokens)
    try:
        for first in windows:
            if config.max_tokens is not None and tokens_fed >= config.max_tokens:
                return
            end = yield from _shard(_rest_of_shard(first, windows), tokenizing, first.shard,
                                    first.shard * shard_size, tokens_fed)
            tokens_fed += int(end.n_tokens.sum())
            if end.last:  # max_tokens reached
                return
        if on_end is not None:
            on_end()
    finally:
        windows.close()


def _rest_of_shard(first: _Window, windows) -> Iterator[_Window]:
    """`first` and the windows after it up to its shard's last; never reads past that, so a
    failure reading the next shard comes only after this shard's `ShardEnd`."""
    window = first
    yield window
    while not window.last:
        window = next(windows)
        yield window


def _shard(windows, tokenizing: Tokenizing, index: int, consumed: int, tokens_fed: int):
    config = tokenizing.config
    all_ids, all_counts, all_texts, skipped, stop, used = [], [], [], 0, False, 0
    all_token_ids = []
    for window in windows:
        doc_ids, documents, encoded = window.doc_ids, window.documents, window.encoded
        counts = np.fromiter((len(ids) for ids in encoded), dtype=np.int64, count=len(encoded))
        used_rows = len(window.rows)
        if config.max_tokens is not None:
            crossing = np.flatnonzero(tokens_fed + np.cumsum(counts) >= config.max_tokens)
            if crossing.size:  # keep the crossing document whole, then stop
                cut = int(crossing[0]) + 1
                used_rows = _row_count_through(window.rows, doc_ids[cut - 1])
                doc_ids, documents, encoded, counts = (doc_ids[:cut], documents[:cut],
                                                       encoded[:cut], counts[:cut])
                stop = True
        tokens_fed += int(counts.sum())
        skipped += sum(1 for _, doc in window.rows[:used_rows] if doc is None)
        used += used_rows
        all_ids.extend(doc_ids)
        all_counts.append(counts)
        if encoded:
            all_token_ids.append(np.concatenate(encoded).astype(np.int32))
        if config.store_text:
            all_texts.extend(documents)
        for batch in _batches(tokenizing)(tokenizing.pieces(doc_ids, encoded), tokenizing):
            batch.shard = index
            yield batch
        if stop:
            break
    end = ShardEnd(index, consumed, consumed + used, np.asarray(all_ids, dtype=np.int64),
                   np.concatenate(all_counts).astype(np.int32) if all_counts else np.zeros(0, np.int32),
                   np.concatenate(all_token_ids) if all_token_ids else np.zeros(0, np.int32),
                   all_texts if config.store_text else None, skipped, stop)
    yield end
    return end


def _batches(tokenizing: Tokenizing):
    if tokenizing.pack:
        from .packing import packed_batches
        return packed_batches
    return batches_of


def _row_count_through(window, doc_id: int) -> int:
    for i, (d, _) in enumerate(window):
        if d == doc_id:
            return i + 1
    raise AssertionError("crossing document not in its window")


def batches_of(pieces, tokenizing: Tokenizing) -> Iterator[Batch]:
    """Sort pieces longest-first (stable, so ties keep source order) and cut batches of
    `batch_size` pieces, smaller when `max_batch_tokens` (padded B*T) would be exceeded."""
    config = tokenizing.config
    pieces = sorted((p for p in pieces if len(p[2])), key=lambda p: -len(p[2]))
    budget = config.max_batch_tokens
    i = 0
    while i < len(pieces):
        width = len(pieces[i][2])  # longest first: the first piece sets the batch width
        n = config.batch_size if budget is None else max(1, min(config.batch_size, budget // width))
        yield make_batch(pieces[i:i + n], tokenizing)
        i += n


def make_batch(pieces, tokenizing: Tokenizing) -> Batch:
    lengths = np.fromiter((len(p[2]) for p in pieces), dtype=np.int64, count=len(pieces))
    ids = np.full((len(pieces), int(lengths.max())), tokenizing.pad_id, dtype=np.int64)
    for row, (_, _, piece) in enumerate(pieces):
        ids[row, :len(piece)] = piece
    real = np.arange(ids.shape[1]) < lengths[:, None]
    keep = real & ~np.isin(ids, tokenizing.excluded) if tokenizing.excluded.size else real
    doc_of_row = np.fromiter((p[0] for p in pieces), dtype=np.int64, count=len(pieces))
    starts = np.fromiter((p[1] for p in pieces), dtype=np.int64, count=len(pieces))
    return _assemble(ids, lengths, keep, doc_of_row, starts)


def _assemble(ids, lengths, keep, doc_of_row, starts) -> Batch:
    ids = np.ascontiguousarray(ids)              # [B, T]; split() passes column slices
    width = ids.shape[1]
    flat = np.flatnonzero(keep)                  # [N] indices into B*T
    row, col = np.divmod(flat, width)
    mask = (np.arange(width) < lengths[:, None]).astype(np.int64)
    return Batch(
        input_ids=torch.from_numpy(ids),
        attention_mask=torch.from_numpy(mask),
        keep_index=torch.from_numpy(flat),
        doc_ids=doc_of_row[row],
        positions=(starts[row] + col).astype(np.int32),
        tokens=ids.reshape(-1)[flat].astype(np.int32),
        piece_doc_ids=doc_of_row,
        piece_starts=starts,
    )


ESTIMATE_DOCS = FIRST_WINDOW_DOCS  # enough for a mean length; the first window's documents


def estimate_shard_size(texts: list, tokenizing: Tokenizing, doc_ids: list[int] | None = None) -> int:
    """Documents per shard for ~SHARD_TARGET_TOKENS tokens fed, from the mean length of
    `texts` (up to the first ESTIMATE_DOCS documents). Counted in tokens, not bytes, so
    shards hold many batches whatever d is; the result is recorded once and a resume
    reuses it. With `doc_ids` (the texts' documents), `tokenizing` remembers their ids for
    the stream, so no document is tokenized twice."""
    from crowstream.pipeline.options import SHARD_TARGET_TOKENS

    kept = [i for i, text in enumerate(texts[:ESTIMATE_DOCS]) if text is not None]
    encoded = tokenizing.encode([texts[i] for i in kept])
    if doc_ids is not None:
        tokenizing.remember([doc_ids[i] for i in kept], encoded)
    mean_tokens = max(1.0, float(np.mean([len(e) for e in encoded])) if encoded else 1.0)
    return max(1, int(SHARD_TARGET_TOKENS / mean_tokens))
