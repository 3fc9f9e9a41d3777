"""Matrices of row vectors: Arrow ``list<...>`` columns <-> numpy ``[n, d]`` matrices, and unit rows.

The lake stores a vector (text, collaborative) or a code list (semantic IDs) as one Arrow list per row,
every list of one length; the jobs and the models work on ``[n, d]`` numpy matrices.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa

EPS = 1e-12  # the smallest norm divided by: a zero row stays zero instead of becoming NaN


def combined(values: pa.Array | pa.ChunkedArray) -> pa.Array:
    """One Arrow array of a column's chunks (an empty one of its type when it has none)."""
    if isinstance(values, pa.ChunkedArray):
        return values.combine_chunks() if values.num_chunks else pa.array([], values.type)
    return values


def list_array(x: np.ndarray, value_type: pa.DataType) -> pa.Array:
    """[n, d] -> an Arrow list<value_type> array of n lists of d values."""
    n, d = x.shape
    offsets = pa.array(np.arange(0, (n + 1) * d, d, dtype=np.int32) if d else np.zeros(n + 1, np.int32))
    return pa.ListArray.from_arrays(offsets, pa.array(np.ascontiguousarray(x).reshape(-1), value_type))


def list_matrix(values: pa.Array | pa.ChunkedArray, dtype, dim: int | None = None) -> np.ndarray:
    """An Arrow list array without nulls, every list of one length (``dim``, else inferred) -> [n, d] ``dtype``.

    A copy: Arrow's buffers are read-only, and torch warns on (and must not write into) those."""
    values = combined(values)
    n = len(values)
    flat = np.array(values.flatten().to_numpy(zero_copy_only=False), dtype)
    if dim is None:
        dim = len(flat) // n if n else 0
    if len(flat) != n * dim:
        raise ValueError(f"lists of unequal length: {len(flat)} values for {n} rows of {dim}")
    return flat.reshape(n, dim)


def vectors_array(vecs: np.ndarray) -> pa.Array:
    """[n, d] -> an Arrow list<float> array (float32) of n vectors."""
    return list_array(np.asarray(vecs, np.float32), pa.float32())


def vectors_matrix(values: pa.Array | pa.ChunkedArray, dim: int | None = None) -> np.ndarray:
    """An Arrow list<float> array of equal-length vectors -> [n, d] float32."""
    return list_matrix(values, np.float32, dim)


def unit_rows(x: np.ndarray, dtype=np.float32) -> np.ndarray:
    """``x`` [n, d] with every row scaled to L2 norm 1 (zero rows stay zero), computed in and returned as
    ``dtype`` (None: the dtype ``x`` has)."""
    x = np.asarray(x, dtype)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), EPS)
