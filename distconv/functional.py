"""Differentiable functions on DistTensors: ``add`` (``a + b``), ``cat`` and ``fork``.

They accept inputs in any distributions (on any grids of the same world, placed or not),
record autograd nodes when gradients are enabled, and move data only through
``DistTensor.redistribute`` / :func:`distconv.tensor.exchange`.
"""
from __future__ import annotations

from . import autograd
from .distribution import Distribution
from .tensor import DistTensor, exchange


def add(a: DistTensor, b: DistTensor) -> DistTensor:
    """``a + b`` of two DistTensors of the same global shape, in ``a``'s distribution.

    ``b`` is moved to ``a``'s distribution first (a residual join of two branches with
    different strategies). Backward: ``da = dy``, ``db = dy`` moved to ``b``'s distribution.
    """
    if not isinstance(a, DistTensor) or not isinstance(b, DistTensor):
        raise TypeError(f"add: expected two DistTensors, got {type(a).__name__} and "
                        f"{type(b).__name__}")
    if tuple(a.shape) != tuple(b.shape):
        raise ValueError(f"add: shapes {tuple(a.shape)} and {tuple(b.shape)} differ")
    if a.dtype != b.dtype:
        raise TypeError(f"add: dtypes {a.dtype} and {b.dtype} differ")
    dist = a.distribution
    out = DistTensor(a.local + b._move(dist).local, dist, a.shape)
    da_dist, db_dist = dist.replace(pending=()), b.distribution.replace(pending=())

    def backward(dy, needs):
        return (dy._move(da_dist) if needs[0] else None,
                dy._move(db_dist) if needs[1] else None)

    autograd.record("add", backward, [a, b], out)
    return out


def cat_output_layout(dists, dim: int) -> Distribution:
    """The output distribution of ``cat`` of inputs in ``dists`` (their distributions, on
    grids of one world) on ``dim``: the first input's splits (no pending) on its grid,
    or, for inputs on different rank sets (branches placed on their own ranks) and
    ``dim`` 1, the channel layout of ``Strategy(sample=1, filter=k, ranks=union)`` over
    the union of their ranks (in order of appearance), so that each rank keeps the
    channels its branch made as far as floor+1 blocks allow, instead of one branch's
    ranks gathering everything. The planner lays its grids out with this too."""
    d = dists[0]
    sets = [x.grid.rank_set() for x in dists]
    if dim != 1 or all(r == sets[0] for r in sets):
        return Distribution(d.grid, d.split)
    from .strategy import AXES
    union = tuple(dict.fromkeys(r for rs in sets for r in rs))
    g = d.grid.like((1, 1, len(union)), AXES, union)
    return Distribution(g, [None, ("channel", "filter")] + [None] * (d.ndim - 2))


def cat(tensors, dim: int = 1) -> DistTensor:
    """Concatenate DistTensors along ``dim`` (``torch.cat``), e.g. Inception's branches on C.

    tensors: a sequence of DistTensors, all of shape ``(..., C_i, ...)`` equal except on
    ``dim``, in any distributions over the same ranks. The result has shape
    ``(..., sum C_i, ...)`` and the first input's splits (floor+1 blocks of the new size,
    which differ from the inputs' blocks; inputs on different rank sets: see
    :func:`cat_output_layout`); its blocks are filled by ONE alltoallv of exactly
    the elements each rank lacks, never a gather. Backward cuts ``dy`` back into each input's
    own distribution, again with one alltoallv.
    """
    tensors = list(tensors)
    if not tensors:
        raise ValueError("cat: expected a non-empty sequence of DistTensors")
    bad = [f"{i}: {type(t).__name__}" for i, t in enumerate(tensors)
           if not isinstance(t, DistTensor)]
    if bad:
        raise TypeError(f"cat: every input must be a DistTensor; got {', '.join(bad)}")
    t0 = tensors[0]
    nd = t0.ndim
    if not -nd <= dim < nd:
        raise ValueError(f"cat: dim {dim} is out of range for {nd}-d tensors")
    dim %= nd
    for i, t in enumerate(tensors):
        other = [s for k, s in enumerate(t.shape) if k != dim]
        want = [s for k, s in enumerate(t0.shape) if k != dim]
        if t.ndim != nd or other != want:
            raise ValueError(f"cat: tensor {i} has shape {tuple(t.shape)}, but every "
                             f"dimension except {dim} must match tensor 0's {tuple(t0.shape)}")
        if t.dtype != t0.dtype:
            raise TypeError(f"cat: tensor {i} has dtype {t.dtype}, tensor 0 has {t0.dtype}")
    # pending sums are resolved first (an exchange moves whole values)
    plain = [t._move(t.distribution.replace(pending=())) if t.distribution.pending else t
             for t in tensors]
    shape = list(t0.shape)
    shape[dim] = sum(t.shape[dim] for t in tensors)
    shape = tuple(shape)
    offsets, acc = [], 0
    for t in tensors:
        off = [0] * nd
        off[dim] = acc
        offsets.append(tuple(off))
        acc += t.shape[dim]
    out_dist = cat_output_layout([t.distribution for t in tensors], dim)
    zero = (0,) * nd
    out = exchange(list(zip(plain, offsets)), [(out_dist, shape, zero)])[0]
    in_layouts = [(t.distribution.replace(pending=()), tuple(t.shape), off)
                  for t, off in zip(tensors, offsets)]

    def backward(dy, needs):
        dy = dy._move(out_dist)
        want = [lay for lay, need in zip(in_layouts, needs) if need]
        got = iter(exchange([(dy, zero)], want) if want else ())
        return tuple(next(got) if need else None for need in needs)

    autograd.record("cat", backward, tensors, out)
    return out


def branch_input(target) -> Distribution | None:
    """The layout a branch reads its input in: ``target`` itself if a Distribution, else
    the ``input_distribution`` of the module's first layer that has one (a Conv2d, Linear
    or BatchNorm2d, in ``named_modules`` order); ``None`` if it has none (elementwise
    layers only: they run where their input is)."""
    if isinstance(target, Distribution):
        return target
    for _, m in target.named_modules():
        d = getattr(m, "input_distribution", None)
        if d is not None:
            return d
    return None


def fork(x: DistTensor, branches) -> list:
    """``x`` moved into the input layout of every branch placed on other ranks than ``x``,
    with ONE exchange, before any branch runs (``torch`` has no counterpart: it is the
    identity per branch). A branch on ``x``'s own ranks gets ``x`` itself: its layers move
    it as they would without the fork (same bytes, same plan).

    x: a DistTensor, or a global array (the model's own input, as a layer accepts it: every
    branch's first layer takes its block of it, so it is passed to each as it is);
    branches: Modules or Distributions (:func:`branch_input`). Returns one tensor per
    branch, each of ``x``'s shape, to be passed to that branch::

        xa, xb = dc.fork(x, [branch_a, branch_b])
        y = dc.cat([branch_a(xa), branch_b(xb)])

    Why: a branch placed on some ranks (``Strategy(ranks=...)``) reads its input from the
    ranks that hold ``x``. If each branch moved its own input when it starts, a rank of
    branch B would wait in B's move for the ranks of branch A to finish A first (they run
    A before they reach B's move), and the branches would run one after the other. After
    a fork every branch holds its input, so branches on disjoint rank sets run at the same
    time; the join (``cat``) waits for the slowest. Backward: each branch's input gradient
    is moved back to ``x``'s layout; those moves run after every branch's backward (the
    fork's nodes are older than all of the branches' nodes, and the engine runs the newest
    ready node first), so the branches' backward passes overlap too.
    """
    branches = list(branches)
    if not isinstance(x, DistTensor):
        if not (hasattr(x, "shape") and hasattr(x, "dtype")):
            raise TypeError(f"fork: expected a DistTensor or a global array, got "
                            f"{type(x).__name__}")
        if not branches:
            raise ValueError("fork: expected a non-empty sequence of branches")
        return [x for _ in branches]
    src = x.distribution.replace(pending=())
    plain = x.redistribute(src) if x.distribution.pending else x
    wants = [branch_input(b) for b in branches]
    if not wants:
        raise ValueError("fork: expected a non-empty sequence of branches")
    wants = [src if d is None else d for d in wants]
    for d in wants:
        if d.ndim != x.ndim:
            raise ValueError(f"fork: a branch reads a {d.ndim}-d input, x is {x.ndim}-d "
                             f"(shape {tuple(x.shape)})")
    zero = (0,) * x.ndim
    moves = [i for i, d in enumerate(wants) if d.grid.ranks != x.grid.ranks]
    got = iter(exchange([(plain, zero)], [(wants[i], x.shape, zero) for i in moves])
               if moves else ())
    outs = [next(got) if i in moves else plain for i in range(len(wants))]

    def backward(dy, needs):
        return (dy._move(src) if needs[0] else None,)

    for i in moves:
        # a recorded move like t.redistribute (the planner skips those: it picks layouts)
        autograd.record("redistribute", backward, [plain], outs[i])
    return outs
