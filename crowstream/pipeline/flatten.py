"""Stage 4, flatten. It owns turning one batch's kept rows of one module (`[N, d]`) and
the batch's row metadata into an Arrow RecordBatch with the row schema: vectorised and
zero-copy (the vector column wraps the tensor's memory), no Python loop per row.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from crowstream.schemas import row_schema


def to_record_batch(doc_ids: np.ndarray, positions: np.ndarray, tokens: np.ndarray,
                    vectors: np.ndarray, dtype: str) -> pa.RecordBatch:
    """[N] ids + [N, d] vectors (C-contiguous) -> RecordBatch(doc_id, position, token, vector)."""
    n, d = vectors.shape
    schema = row_schema(d, dtype)
    values = pa.array(np.ascontiguousarray(vectors).reshape(-1))  # [N*d], zero-copy
    vector = pa.FixedSizeListArray.from_arrays(values, type=schema.field("vector").type)
    return pa.RecordBatch.from_arrays(
        [pa.array(doc_ids, pa.int64()), pa.array(positions, pa.int32()),
         pa.array(tokens, pa.int32()), vector],
        schema=schema,
    )
