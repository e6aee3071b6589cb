"""Packing: several documents per batch row, each attending only to itself. It owns
laying pieces (documents or chunks) into rows, the packed `Batch`, and the mask the
tracer passes to the model.

A packed row holds its pieces end to end; each token carries the index of its piece in
the row (`segments`) and its position within the piece (`position_ids`, restarting at 0:
GPT-2's positions are learned, so they must restart). The model gets a 4D mask
`[B, 1, T, T]`, block-diagonal and causal (`packed_mask`): bool (True = attend) for sdpa,
a quarter of the bytes and one pass fewer; additive float (0 = attend, the dtype's
minimum = blocked) for eager attention, where a bool mask would be silently wrong. No row
is ever fully blocked (a token always sees itself), so sdpa never meets an all-False row.
A row's tail padding is one
more segment with position 0 (positions counted on could pass the model's maximum), its
outputs are never kept. Measured against single-document forwards: max difference 7e-7
(sdpa) and 1e-6 (eager) on every hidden state, for GPT-2 and Llama (transformers 5.24).

Rows are as wide as the window's longest piece (first fit, longest first), so a window
of similar lengths packs like the padded batching and a mixed one loses its padding. The
attention is dense over the row (T^2), so packing gains most where sorted batches still
pad a lot, and never makes rows wider than `context_size`.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator

import numpy as np
import torch

from .batching import Batch, Tokenizing

# model_type -> packs: the architectures whose forward takes a 4D additive mask and
# position_ids, each one tested against unpadded forwards (tests/test_values.py)
PACKING_MODEL_TYPES = ("gpt2", "llama")
PACKING_ATTENTION = ("sdpa", "eager")  # flash attention takes no 4D mask


def supports_packing(model) -> bool:
    config = getattr(model, "config", None)
    return (getattr(config, "model_type", None) in PACKING_MODEL_TYPES
            and getattr(config, "_attn_implementation", None) in PACKING_ATTENTION)


def packed_batches(pieces, tokenizing: Tokenizing) -> Iterator[Batch]:
    """Pieces laid into rows as wide as the longest (first fit, longest first), then
    batches of at most `batch_size` rows and `max_batch_tokens` padded tokens."""
    config = tokenizing.config
    pieces = sorted((p for p in pieces if len(p[2])), key=lambda p: -len(p[2]))
    if not pieces:
        return
    width = len(pieces[0][2])
    free = np.empty(len(pieces), dtype=np.int64)  # room left in each row
    rows: list[list] = []
    for piece in pieces:  # one numpy search per piece, none per token
        fits = np.flatnonzero(free[:len(rows)] >= len(piece[2]))
        row = int(fits[0]) if fits.size else len(rows)
        if row == len(rows):
            rows.append([])
            free[row] = width
        rows[row].append(piece)
        free[row] -= len(piece[2])
    budget = config.max_batch_tokens
    n = config.batch_size if budget is None else max(1, min(config.batch_size, budget // width))
    for i in range(0, len(rows), n):
        yield make_packed_batch(rows[i:i + n], tokenizing)


def make_packed_batch(rows: list[list], tokenizing: Tokenizing) -> Batch:
    """A Batch of `rows`, each a list of (doc_id, start, ids) pieces laid end to end."""
    width = max(sum(len(p[2]) for p in row) for row in rows)
    shape = (len(rows), width)
    ids = np.full(shape, tokenizing.pad_id, dtype=np.int64)
    segments, local, doc_of, absolute = (np.zeros(shape, dtype=np.int64) for _ in range(4))
    real = np.zeros(shape, dtype=bool)
    steps = np.arange(width)
    for b, row in enumerate(rows):  # a few slice assignments per piece
        at = 0
        for k, (doc_id, start, piece) in enumerate(row):
            span = slice(at, at + len(piece))
            ids[b, span], segments[b, span], local[b, span] = piece, k, steps[:len(piece)]
            doc_of[b, span], absolute[b, span], real[b, span] = doc_id, start + steps[:len(piece)], True
            at += len(piece)
        segments[b, at:] = len(row)  # tail padding: its own segment, position 0
    keep = real & ~np.isin(ids, tokenizing.excluded) if tokenizing.excluded.size else real
    flat = np.flatnonzero(keep)  # [N] indices into B*T
    pieces = [p for row in rows for p in row]
    return Batch(
        input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(real.astype(np.int64)),
        keep_index=torch.from_numpy(flat), doc_ids=doc_of.reshape(-1)[flat],
        positions=absolute.reshape(-1)[flat].astype(np.int32),
        tokens=ids.reshape(-1)[flat].astype(np.int32),
        piece_doc_ids=np.array([p[0] for p in pieces], dtype=np.int64),
        piece_starts=np.array([p[1] for p in pieces], dtype=np.int64),
        segments=torch.from_numpy(segments), position_ids=torch.from_numpy(local),
        packed_rows=rows)


def split_packed(batch: Batch) -> tuple[Batch, Batch]:
    """Halves of a packed batch (OOM back-off): its rows, or one row's pieces."""
    rows = batch.packed_rows
    if len(rows) == 1:
        half = len(rows[0]) // 2
        parts = ([rows[0][:half]], [rows[0][half:]])
    else:
        parts = (rows[:len(rows) // 2], rows[len(rows) // 2:])
    tokenizing = _Layout(batch)
    first, second = (make_packed_batch(part, tokenizing) for part in parts)
    first.shard = second.shard = batch.shard
    return first, second


class _Layout:
    """What make_packed_batch needs of a Tokenizing, recovered from a batch."""

    def __init__(self, batch: Batch):
        real = batch.attention_mask.numpy().astype(bool)
        pads = batch.input_ids.numpy()[~real]
        self.pad_id = int(pads[0]) if pads.size else 0
        kept = np.zeros(real.size, dtype=bool)
        kept[batch.keep_index.numpy()] = True
        dropped = batch.input_ids.numpy().reshape(-1)[real.reshape(-1) & ~kept]
        self.excluded = np.unique(dropped)


def mask_dtype(model) -> torch.dtype:
    """The packed mask's dtype for `model`: bool for sdpa, the model's dtype (additive)
    for eager attention."""
    if getattr(getattr(model, "config", None), "_attn_implementation", None) == "sdpa":
        return torch.bool
    return getattr(model, "dtype", torch.float32)


def packed_mask(segments: torch.Tensor, dtype: torch.dtype, device=None) -> torch.Tensor:
    """[B, T] segment ids (on the host) -> [B, 1, T, T] mask on `device`: a token attends
    to the tokens of its own segment up to itself, nothing else. `dtype` bool: True =
    attend (sdpa); a float dtype: additive, 0 = attend and the dtype's minimum = blocked
    (eager). On a GPU it is built there from the ids (`_compared`): B x T ids cross
    instead of B x T x T bools (32 MiB per batch of 2 x 4,096), and no host thread builds
    it. Elsewhere it is built on the host one causal block per segment (a few per row),
    not by comparing every pair of tokens: that broadcast compare was 3% of a CPU ceiling
    capture."""
    if device is not None and torch.device(device).type == "cuda":
        mask = _compared(segments, device)
    else:
        mask = torch.from_numpy(_blocks(segments.numpy())).to(device)
    if dtype == torch.bool:
        return mask
    # scalars made on the device (torch.full): a host value copied there would sync
    return torch.where(mask, torch.zeros((), dtype=dtype, device=mask.device),
                       torch.full((), torch.finfo(dtype).min, dtype=dtype, device=mask.device))


def _blocks(ids: np.ndarray) -> np.ndarray:
    """[B, T] segment ids -> [B, 1, T, T] bool, one causal block per segment (segments are
    runs within a row)."""
    rows, width = ids.shape
    causal = _causal(width)
    allowed = np.zeros((rows, 1, width, width), dtype=bool)
    for b in range(rows):  # a slice copy per segment
        edges = [0, *(np.flatnonzero(ids[b, 1:] != ids[b, :-1]) + 1).tolist(), width]
        for start, end in zip(edges[:-1], edges[1:]):
            allowed[b, 0, start:end, start:end] = causal[:end - start, :end - start]
    return allowed


def _compared(segments: torch.Tensor, device) -> torch.Tensor:
    """[B, T] segment ids (pinned on the host: no sync) -> [B, 1, T, T] bool on `device`:
    the same segment, and not after. A segment id is unique within its row, so this is
    `_blocks`' mask."""
    ids = segments.to(device, non_blocking=True)
    width = ids.shape[1]
    causal = torch.ones(width, width, dtype=torch.bool, device=ids.device).tril_()
    return ((ids[:, :, None] == ids[:, None, :]) & causal)[:, None]


@functools.lru_cache(maxsize=4)
def _causal(width: int) -> np.ndarray:
    causal = np.tri(width, dtype=bool)
    causal.flags.writeable = False
    return causal
