"""MetaArray (shape-only arrays) against NumPy: indexing shapes, dtypes, values refused."""
import random

import numpy as np
import pytest

from distconv.meta import MetaArray

SHAPES = [(5,), (4, 7), (3, 1, 6), (2, 0, 5, 3), (6, 5, 4, 3)]
BOUNDS = [None, -9, -3, -1, 0, 1, 2, 5, 9]
STEPS = [None, 1, 2, -1, -2, 3]


def _random_slices(rng, ndim, n):
    for _ in range(n):
        k = rng.randint(0, ndim)
        yield tuple(slice(rng.choice(BOUNDS), rng.choice(BOUNDS), rng.choice(STEPS))
                    for _ in range(k))


def _slice_shape_ignoring_steps(shape, idx):
    """A wrong rule (stop - start, steps ignored): the negative control."""
    out = [len(range(*slice(i.start, i.stop).indices(n))) for i, n in zip(idx, shape)]
    return tuple(out) + tuple(shape[len(idx):])


@pytest.mark.parametrize("shape", SHAPES)
def test_basic_slices_give_numpys_shapes(shape):
    rng = random.Random(sum(shape) + len(shape))
    a, m = np.zeros(shape), MetaArray(shape, np.float32)
    wrong = 0
    for idx in _random_slices(rng, len(shape), 300):
        assert m[idx].shape == a[idx].shape, (shape, idx)
        if len(idx) == 1:
            assert m[idx[0]].shape == a[idx[0]].shape, (shape, idx[0])
        assert m[idx].dtype == np.float32
        wrong += _slice_shape_ignoring_steps(shape, idx) != a[idx].shape
    if all(shape):
        assert wrong > 0  # the control: a rule that ignores steps is caught


@pytest.mark.parametrize("idx", [0, -1, (1, slice(None)), (Ellipsis, 0), (None, slice(1, 3)),
                                 (slice(None), None, 2), (slice(0, 2), 1, Ellipsis)])
def test_other_indices_give_numpys_shapes(idx):
    shape = (4, 5, 3)
    assert MetaArray(shape, "float64")[idx].shape == np.zeros(shape)[idx].shape


def test_dtypes_and_refusals():
    for dt in ("float32", np.float64, np.dtype("float16")):
        assert MetaArray((2, 3), dt).dtype == np.dtype(dt)
    with pytest.raises(ValueError, match="negative dimension"):
        MetaArray((2, -1), np.float32)
    m = MetaArray((3,), np.float32)
    with pytest.raises(TypeError, match="shape-only array"):
        m[MetaArray((1,), np.int64)]
    with pytest.raises(TypeError, match="no values"):
        bool(m)
    assert np.isnan(float(MetaArray((), np.float32)))
