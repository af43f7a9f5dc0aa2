"""The comparison the single-process op tests share: normwise relative error."""
import numpy as np

RTOL = {np.dtype(np.float64): 1e-10, np.dtype(np.float32): 1e-4}


def rel_err(actual, expected):
    """max|a - e| / max|e| (the absolute error when e is all zero; 0 for empty arrays)."""
    a = np.asarray(actual, dtype=np.float64)
    e = np.asarray(expected, dtype=np.float64)
    assert a.shape == e.shape, f"shape {a.shape} != {e.shape}"
    if e.size == 0:
        return 0.0
    diff = np.abs(a - e).max()
    scale = np.abs(e).max()
    return float(diff if scale == 0 else diff / scale)
