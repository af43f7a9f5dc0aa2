"""Shape-only arrays: :class:`MetaArray` carries a shape and a dtype but no data.

A DistTensor whose ``local`` block is a MetaArray runs through the real layer, autograd,
redistribution and optimizer code unchanged: NumPy calls on it dispatch here through
``__array_ufunc__`` / ``__array_function__`` and give MetaArrays of the result's shape and
dtype (NumPy's own broadcasting and type rules, applied to zero-size stand-ins); the ops
with their own kernels dispatch to :mod:`distconv.ops.shapes`. Reading a value gives NaN
(``float``) or raises (``int``, ``bool``), so code that depends on data shows up. Nothing
is allocated: a shape-only step of ResNet-50 at batch 256 costs what its Python costs.
"""
from __future__ import annotations

import math

import numpy as np

_DUMMY = np.zeros(1, np.uint8)


def _strided(shape):
    """A zero-stride view of ``shape`` (no memory), for NumPy's indexing rules."""
    return np.lib.stride_tricks.as_strided(_DUMMY, shape=tuple(shape), strides=(0,) * len(shape))


def _stand_in(a):
    """A tiny array with ``a``'s dtype (and 0-d shape) for NumPy's type rules."""
    if isinstance(a, MetaArray):
        return np.zeros((), a.dtype)
    if isinstance(a, np.ndarray):
        return np.zeros((), a.dtype)
    return a


def _shape_of(a):
    return a.shape if isinstance(a, (MetaArray, np.ndarray)) else np.shape(a)


def _norm_axis(axis, ndim):
    if axis is None:
        return tuple(range(ndim))
    if isinstance(axis, (int, np.integer)):
        axis = (int(axis),)
    return tuple(int(a) % ndim if ndim else 0 for a in axis)


class MetaArray:
    """``MetaArray(shape, dtype)``: an array without data (see the module doc)."""

    __slots__ = ("shape", "dtype")
    __array_priority__ = 1000

    def __init__(self, shape, dtype):
        self.shape = tuple(int(s) for s in shape)
        self.dtype = dtype if isinstance(dtype, np.dtype) else np.dtype(dtype)
        if self.shape and min(self.shape) < 0:
            raise ValueError(f"MetaArray: negative dimension in {self.shape}")

    # ------------------------------------------------------------ attributes
    @property
    def ndim(self):
        return len(self.shape)

    @property
    def size(self):
        return math.prod(self.shape)

    @property
    def itemsize(self):
        return self.dtype.itemsize

    @property
    def nbytes(self):
        return self.size * self.dtype.itemsize

    @property
    def T(self):
        return MetaArray(self.shape[::-1], self.dtype)

    @property
    def flags(self):
        """Like ``ndarray.flags``: a shape-only array is C-contiguous."""
        return _Flags(self.ndim <= 1)

    def __len__(self):
        if not self.shape:
            raise TypeError("len() of a 0-d MetaArray")
        return self.shape[0]

    def __repr__(self):
        return f"MetaArray(shape={self.shape}, dtype={self.dtype})"

    # ------------------------------------------------------------ values
    def __float__(self):
        return float("nan")

    def __int__(self):
        raise TypeError("a shape-only array has no values: int() of it is undefined")

    __index__ = __int__

    def __bool__(self):
        raise TypeError("a shape-only array has no values: its truth value is undefined")

    def __array__(self, dtype=None, copy=None):
        raise TypeError("a shape-only array has no data to convert to a NumPy array")

    def item(self):
        return float("nan")

    def tolist(self):
        raise TypeError("a shape-only array has no values: tolist() is undefined")

    # ------------------------------------------------------------ shape ops
    def reshape(self, *shape, order="C"):
        if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
            shape = tuple(shape[0])
        shape = [int(s) for s in shape]
        if shape.count(-1) > 1:
            raise ValueError(f"reshape: more than one -1 in {tuple(shape)}")
        if -1 in shape:
            known = math.prod(s for s in shape if s != -1)
            if known == 0 or self.size % known:
                raise ValueError(f"cannot reshape array of size {self.size} into shape "
                                 f"{tuple(shape)}")
            shape[shape.index(-1)] = self.size // known
        if math.prod(shape) != self.size:
            raise ValueError(f"cannot reshape array of size {self.size} into shape "
                             f"{tuple(shape)}")
        return MetaArray(shape, self.dtype)

    def ravel(self, order="C"):
        return MetaArray((self.size,), self.dtype)

    flatten = ravel

    def transpose(self, *axes):
        if len(axes) == 1 and isinstance(axes[0], (tuple, list)):
            axes = tuple(axes[0])
        axes = axes or tuple(range(self.ndim))[::-1]
        return MetaArray([self.shape[a] for a in axes], self.dtype)

    def swapaxes(self, a, b):
        s = list(self.shape)
        s[a], s[b] = s[b], s[a]
        return MetaArray(s, self.dtype)

    def astype(self, dtype, copy=True, **kw):
        return MetaArray(self.shape, dtype)

    def copy(self, order="C"):
        return MetaArray(self.shape, self.dtype)

    def view(self, dtype=None):
        return self if dtype is None else MetaArray(self.shape, dtype)

    def fill(self, value):
        return None

    def __getitem__(self, idx):
        parts = idx if type(idx) is tuple else (idx,)
        if len(parts) <= len(self.shape) and all(type(i) is slice for i in parts):
            # basic slices: each dim's length as range() counts it (NumPy's rule)
            return MetaArray([len(range(*i.indices(n))) for i, n in zip(parts, self.shape)]
                             + list(self.shape[len(parts):]), self.dtype)
        if isinstance(idx, MetaArray) or (isinstance(idx, tuple) and
                                          any(isinstance(i, MetaArray) for i in idx)):
            raise TypeError("indexing with a shape-only array has no defined result shape")
        return MetaArray(_strided(self.shape)[idx].shape, self.dtype)

    def __setitem__(self, idx, value):
        return None

    # ------------------------------------------------------------ reductions
    def _reduce(self, axis=None, dtype=None, keepdims=False, out_dtype=None):
        ax = _norm_axis(axis, self.ndim)
        shape = [1 if i in ax else s for i, s in enumerate(self.shape)] if keepdims else \
            [s for i, s in enumerate(self.shape) if i not in ax]
        return MetaArray(shape, out_dtype or dtype or self.dtype)

    def sum(self, axis=None, dtype=None, out=None, keepdims=False):
        dt = dtype or np.add.reduce(np.zeros(1, self.dtype)).dtype
        return self._reduce(axis, dt, keepdims)

    def mean(self, axis=None, dtype=None, out=None, keepdims=False):
        dt = dtype or np.zeros(1, self.dtype).mean().dtype
        return self._reduce(axis, dt, keepdims)

    def max(self, axis=None, out=None, keepdims=False):
        return self._reduce(axis, None, keepdims)

    min = max

    def prod(self, axis=None, dtype=None, out=None, keepdims=False):
        return self.sum(axis, dtype, out, keepdims)

    def argmax(self, axis=None, out=None, keepdims=False):
        return self._reduce(axis, None, keepdims, out_dtype=np.intp)

    argmin = argmax

    def any(self, axis=None, out=None, keepdims=False):
        return self._reduce(axis, None, keepdims, out_dtype=np.bool_)

    all = any

    # ------------------------------------------------------------ NumPy protocols
    def __array_ufunc__(self, ufunc, method, *inputs, out=None, **kwargs):
        if method == "__call__":
            with np.errstate(all="ignore"):
                if ufunc.signature:  # a gufunc (matmul): stand-ins with the core dims
                    ins = [np.zeros((1,) * len(_shape_of(a)), a.dtype)
                           if isinstance(a, (MetaArray, np.ndarray)) else a for a in inputs]
                else:
                    ins = [_stand_in(a) for a in inputs]
                res = ufunc(*ins, **{k: v for k, v in kwargs.items() if k in ("dtype",)})
            if ufunc is np.matmul:
                shape = _matmul_shape(*[_shape_of(a) for a in inputs])
            else:
                shape = np.broadcast_shapes(*[_shape_of(a) for a in inputs])
            if isinstance(res, tuple):
                return tuple(MetaArray(shape, r.dtype) for r in res)
            if out is not None:
                return out[0] if isinstance(out, tuple) else out
            return MetaArray(shape, res.dtype)
        if method == "reduce":
            a = inputs[0]
            dt = kwargs.get("dtype") or ufunc.reduce(np.zeros(1, a.dtype)).dtype
            return a._reduce(kwargs.get("axis", 0), dt, kwargs.get("keepdims", False))
        if method == "at":
            return None
        return NotImplemented

    def __array_function__(self, func, types, args, kwargs):
        impl = _FUNCS.get(func)
        if impl is None:
            raise TypeError(f"shape-only execution does not support numpy.{func.__name__}")
        return impl(*args, **kwargs)

    # ------------------------------------------------------------ operators
    def __add__(self, o): return np.add(self, o)
    def __radd__(self, o): return np.add(o, self)
    def __sub__(self, o): return np.subtract(self, o)
    def __rsub__(self, o): return np.subtract(o, self)
    def __mul__(self, o): return np.multiply(self, o)
    def __rmul__(self, o): return np.multiply(o, self)
    def __truediv__(self, o): return np.true_divide(self, o)
    def __rtruediv__(self, o): return np.true_divide(o, self)
    def __pow__(self, o): return np.power(self, o)
    def __matmul__(self, o): return np.matmul(self, o)
    def __rmatmul__(self, o): return np.matmul(o, self)
    def __and__(self, o): return np.logical_and(self, o)
    def __or__(self, o): return np.logical_or(self, o)
    def __lt__(self, o): return np.less(self, o)
    def __le__(self, o): return np.less_equal(self, o)
    def __gt__(self, o): return np.greater(self, o)
    def __ge__(self, o): return np.greater_equal(self, o)
    def __eq__(self, o): return np.equal(self, o)
    def __ne__(self, o): return np.not_equal(self, o)
    def __neg__(self): return MetaArray(self.shape, self.dtype)
    def __pos__(self): return self
    def __abs__(self): return MetaArray(self.shape, self.dtype)
    def __invert__(self): return MetaArray(self.shape, self.dtype)

    __hash__ = None

    def _inplace(self, o):
        return self

    __iadd__ = __isub__ = __imul__ = __itruediv__ = __ipow__ = __iand__ = __ior__ = _inplace


class _Flags:
    """``flags`` of a MetaArray (attribute and item access, as NumPy's)."""

    def __init__(self, f_contiguous):
        self.c_contiguous, self.f_contiguous, self.writeable = True, f_contiguous, True

    def __getitem__(self, key):
        return {"C_CONTIGUOUS": self.c_contiguous, "F_CONTIGUOUS": self.f_contiguous,
                "WRITEABLE": self.writeable}[key.upper()]


def _matmul_shape(a, b):
    a, b = tuple(a), tuple(b)
    if len(a) == 1:
        a1 = (1,) + a
    else:
        a1 = a
    b1 = b + (1,) if len(b) == 1 else b
    if a1[-1] != b1[-2]:
        raise ValueError(f"matmul: shapes {a} and {b} do not align")
    batch = np.broadcast_shapes(a1[:-2], b1[:-2])
    out = tuple(batch) + (a1[-2], b1[-1])
    if len(a) == 1:
        out = out[:-2] + out[-1:]
    if len(b) == 1:
        out = out[:-1]
    return out


def _dtype_of(*arrays):
    with np.errstate(all="ignore"):
        return np.result_type(*[_stand_in(a) for a in arrays])


# ------------------------------------------------------------------ NumPy functions
def _concatenate(arrays, axis=0, out=None, dtype=None, **kw):
    arrays = list(arrays)
    shapes = [list(_shape_of(a)) for a in arrays]
    if axis is None:
        return MetaArray((sum(math.prod(s) for s in shapes),), dtype or _dtype_of(*arrays))
    ax = axis % len(shapes[0])
    s = list(shapes[0])
    s[ax] = sum(x[ax] for x in shapes)
    return MetaArray(s, dtype or _dtype_of(*arrays))


def _stack(arrays, axis=0, out=None, **kw):
    arrays = list(arrays)
    s = list(_shape_of(arrays[0]))
    s.insert(axis % (len(s) + 1), len(arrays))
    return MetaArray(s, _dtype_of(*arrays))


def _where(cond, x=None, y=None):
    if x is None:
        raise TypeError("numpy.where(condition) of a shape-only array has no defined shape")
    return MetaArray(np.broadcast_shapes(_shape_of(cond), _shape_of(x), _shape_of(y)),
                     _dtype_of(x, y))


def _like(a, dtype=None, order="K", subok=True, shape=None, **kw):
    return MetaArray(a.shape if shape is None else shape, dtype or a.dtype)


def _full_like(a, fill_value, dtype=None, **kw):
    return MetaArray(a.shape, dtype or a.dtype)


def _asarray(a, dtype=None, order=None, **kw):
    if isinstance(a, MetaArray):
        return a if dtype is None else a.astype(dtype)
    if isinstance(a, (list, tuple)):
        items = list(a)
        return _stack([_asarray(i) for i in items]).astype(dtype or _dtype_of(*items)) \
            if items else MetaArray((0,), dtype or np.float64)
    return np.asarray(a, dtype=dtype)


def _copyto(dst, src, casting="same_kind", where=True):
    return None


def _reduce_fn(name):
    def f(a, axis=None, dtype=None, out=None, keepdims=False, **kw):
        m = getattr(MetaArray, name)
        if name in ("max", "min", "any", "all", "argmax", "argmin"):
            return m(a, axis=axis, keepdims=keepdims)
        return m(a, axis=axis, dtype=dtype, keepdims=keepdims)
    return f


def _einsum(subscripts, *operands, **kw):
    ins, out = subscripts.replace(" ", "").split("->")
    sizes = {}
    for spec, op in zip(ins.split(","), operands):
        for ch, n in zip(spec, _shape_of(op)):
            sizes[ch] = n
    return MetaArray([sizes[c] for c in out], _dtype_of(*operands))


def _tensordot(a, b, axes=2):
    if isinstance(axes, int):
        ax_a, ax_b = list(range(a.ndim - axes, a.ndim)), list(range(axes))
    else:
        ax_a, ax_b = [list(np.atleast_1d(x)) for x in axes]
    sa = [s for i, s in enumerate(_shape_of(a)) if i not in [x % a.ndim for x in ax_a]]
    sb = [s for i, s in enumerate(_shape_of(b)) if i not in [x % b.ndim for x in ax_b]]
    return MetaArray(sa + sb, _dtype_of(a, b))


_FUNCS = {
    np.concatenate: _concatenate, np.stack: _stack, np.where: _where,
    np.empty_like: _like, np.zeros_like: _like, np.ones_like: _like, np.full_like: _full_like,
    np.asarray: _asarray, np.array: lambda a, dtype=None, copy=True, **kw: _asarray(a, dtype),
    np.ascontiguousarray: lambda a, dtype=None, **kw: _asarray(a, dtype),
    np.copy: lambda a, **kw: a.copy(), np.copyto: _copyto,
    np.reshape: lambda a, shape, *args, **kw: a.reshape(shape),
    np.transpose: lambda a, axes=None: a.transpose(*(axes or ())),
    np.ravel: lambda a, order="C": a.ravel(), np.shape: lambda a: a.shape,
    np.ndim: lambda a: a.ndim, np.size: lambda a, axis=None: a.size if axis is None
    else a.shape[axis],
    np.broadcast_to: lambda a, shape, **kw: MetaArray(shape, a.dtype),
    np.expand_dims: lambda a, axis: a.reshape(_strided(a.shape)[
        tuple([slice(None)] * (axis % (a.ndim + 1)) + [None])].shape),
    np.sum: _reduce_fn("sum"), np.mean: _reduce_fn("mean"), np.max: _reduce_fn("max"),
    np.amax: _reduce_fn("max"), np.min: _reduce_fn("min"), np.amin: _reduce_fn("min"),
    np.prod: _reduce_fn("prod"), np.any: _reduce_fn("any"), np.all: _reduce_fn("all"),
    np.argmax: _reduce_fn("argmax"), np.einsum: _einsum, np.tensordot: _tensordot,
    np.dot: lambda a, b, out=None: np.matmul(a, b),
    np.moveaxis: lambda a, src, dst: MetaArray(
        np.moveaxis(_strided(a.shape), src, dst).shape, a.dtype),
}


class _Namespace:
    """``array_module`` of a MetaArray: NumPy, with creation functions giving MetaArrays
    (functions of MetaArray arguments dispatch through ``__array_function__``)."""

    __name__ = "distconv.meta.xp"

    @staticmethod
    def empty(shape, dtype=float, order="C"):
        return MetaArray(shape if isinstance(shape, (tuple, list)) else (shape,), dtype)

    zeros = ones = empty

    @staticmethod
    def full(shape, fill_value, dtype=None, order="C"):
        return MetaArray(shape if isinstance(shape, (tuple, list)) else (shape,),
                         dtype or np.asarray(fill_value).dtype)

    @staticmethod
    def arange(*args, dtype=None):
        return MetaArray((len(range(*[int(a) for a in args])),), dtype or np.int64)

    asarray = staticmethod(_asarray)
    array = staticmethod(lambda a, dtype=None, copy=True, order="K": _asarray(a, dtype))
    ascontiguousarray = staticmethod(lambda a, dtype=None: _asarray(a, dtype))

    def __getattr__(self, name):
        return getattr(np, name)


xp = _Namespace()


def is_meta(a) -> bool:
    return isinstance(a, MetaArray)
