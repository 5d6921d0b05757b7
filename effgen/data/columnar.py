"""numpy columns to Arrow and back, zero-copy, without importing pandas.

`pa.array(ndarray)` and `Array.to_numpy()` import pandas on first use (pyarrow checks
for pandas objects): half a second of a preprocessing run that never touches pandas.
These helpers handle what preprocess moves around: flat, null-free numeric columns.
"""

import numpy as np
import pyarrow as pa


def to_arrow(values: np.ndarray) -> pa.Array:
    """A 1-d numeric numpy array as an Arrow array sharing its memory."""
    values = np.ascontiguousarray(values)
    if values.ndim != 1 or values.dtype.kind not in "iuf":
        raise TypeError(f"expected a flat numeric array, got {values.dtype} {values.shape}")
    return pa.Array.from_buffers(pa.from_numpy_dtype(values.dtype), len(values),
                                 [None, pa.py_buffer(values)])


def to_numpy(column) -> np.ndarray:
    """A null-free numeric Arrow Array or ChunkedArray as numpy (zero-copy when it has one
    chunk)."""
    chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
    dtype = np.dtype(column.type.to_pandas_dtype())
    parts = []
    for c in chunks:
        if c.null_count or not (pa.types.is_integer(c.type) or pa.types.is_floating(c.type)):
            raise TypeError(f"expected a null-free numeric column, got {c.type} "
                            f"with {c.null_count} nulls")
        parts.append(np.frombuffer(c.buffers()[1], dtype=dtype, count=len(c),
                                   offset=c.offset * dtype.itemsize))
    if len(parts) == 1:
        return parts[0]
    return np.concatenate(parts) if parts else np.empty(0, dtype)
