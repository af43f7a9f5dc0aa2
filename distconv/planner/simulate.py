"""Step time of a plan: an additive total and a replay with overlapped gradient allreduces.

:func:`walk` lists every layer and join of the graph in execution order with its
:class:`.costs.LayerCost` under ``plan`` (a block's branches run one after another on all
ranks; a cat join is one row per branch, its share of the concatenation), then the
cross-entropy loss of each output (:meth:`.costs.CostModel.loss`: its collectives).
:func:`additive_time` sums them (what the search minimises). :func:`simulate` replays
one training step as FlexFlow's task-graph simulator does, with one compute stream and
one stream for gradient allreduces:

* forward: each layer's local compute, then its (blocking) collectives, in order;
* backward, in the order the real backward runs the layers (:func:`backward_order`: the
  reverse of the order the traced forward recorded them, branches of a fork included):
  compute then blocking collectives; when a layer's backward ends
  its gradients join :class:`distconv.optim.GradientSync`'s buckets (the same
  :class:`~distconv.optim.BucketPolicy`, buckets of ``cost.bucket_bytes``): a full bucket
  is one allreduce queued on the allreduce stream (``overlap=True``), running while later
  layers compute; the buckets left, or every bucket when ``overlap=False`` (MPI without
  asynchronous progress, or ``--no-overlap``), are sent after backward. With
  ``cost.bucket_bytes=None`` the step reduces as :func:`distconv.nn.sync_gradients` does,
  one allreduce per parameter, queued when its layer's backward ends (or blocking there
  with ``overlap=False``);
* the step ends when both streams are done, plus the optimizer step.
"""
from __future__ import annotations

import math

from .strategies import as_strategy


def walk(cost, plan: dict, detail: bool = False, input_dist=None) -> list:
    """``[(name, kind, LayerCost, strategy or None), ...]`` in execution order, the input
    in ``input_dist`` (default: where the first strategic layer computes, as
    ``DistLoader`` delivers it).

    Branches placed on disjoint rank sets (:mod:`.placement`) run at the same time: their
    rows (``dc.fork``'s move onto the branch's ranks, its layers, its share of the cat)
    are merged into one row ``"<block>.(placed)"`` holding the slowest branch's times and
    the largest memory of any branch (each rank holds only its own branch), unless
    ``detail``."""
    return _walk(cost, plan, detail, input_dist)[0]


def backward_order(rows, seqs) -> list:
    """The indices of ``rows`` in the order the real backward runs them: newest forward
    node first (:func:`distconv.autograd.backward` breaks ties between ready nodes by
    recording order, newest first, so over a graph whose every edge carries a gradient
    it runs the nodes in exactly the reverse of the order the forward recorded them),
    rows of one node (a cat's shares) in reverse. ``seqs``: each row's recording index
    (:func:`_walk`); without one for every row (a graph not traced), the reverse of
    ``rows``."""
    n = len(rows)
    if any(q is None for q in seqs):
        return list(range(n - 1, -1, -1))
    return sorted(range(n), key=lambda i: (-seqs[i], -i))


def _walk(cost, plan: dict, detail: bool = False, input_dist=None) -> tuple:
    """``(rows, seqs)``: :func:`walk`'s rows and the recording index of the forward node
    behind each (a layer's own; a fork's move just after the fork's input; a join's or a
    cat share's the join node's; a merged placed row its first row's), None where the
    graph was not traced."""
    from .placement import fork_target, group_tags, parallel_branches
    graph = cost.graph
    rows, tags, seqs = [], [], []
    first = next(layer for layer in graph.layers() if layer.strategic)
    missing = [n for n in graph.strategic_names() if n not in plan]
    if missing:
        raise ValueError(f"the plan has no strategy for layers {missing}")
    dist = cost.input_dist(plan[first.name]) if input_dist is None else input_dist
    ltag, btag = group_tags(graph, plan, cost.p)

    def one(layer, d):
        st = as_strategy(plan[layer.name]) if layer.strategic else None
        c = cost.layer(layer, st, d)
        rows.append((layer.name, layer.kind, c, st))
        tags.append(ltag.get(layer.name))
        seqs.append(layer.seq)
        return c.out_dist

    def fork(block, i, d):
        t = fork_target(block, i, d, plan, len(block.in_shape))
        if t is not d:
            rows.append((f"{block.name}.(fork {i})", "fork",
                         cost.move(block.in_shape, d, t), None))
            tags.append(_branch_tag(block, i, plan, cost.p, btag, parallel_branches))
            seqs.append(None if block.fork_seq is None else block.fork_seq + 0.5)
        return t

    def join(block, *dists):
        if block.op == "cat":  # one row per branch: its share of the concatenation
            from ..functional import cat_output_layout
            out = cat_output_layout(dists, 1)
            # the output layout is passed only where it is not the first input's
            extra = () if out == cat_output_layout(dists[:1], 1) else (out,)
            for i, d in enumerate(dists):
                rows.append((f"{block.name}.(cat {i})" if block.name else f"(cat {i})",
                             "cat", cost.cat_part(block, i, d, dists[0], *extra), None))
                tags.append(_branch_tag(block, i, plan, cost.p, btag, parallel_branches))
                seqs.append(block.seq)
            return
        if block.op == "output":  # each other output's loss
            for i, (shape, d) in enumerate(zip(block.branch_shapes()[1:], dists[1:]), 1):
                loss_row(f"{block.name}.(loss {i})", shape, d)
            return
        rows.append((block.name + ".(join)" if block.name else "(join)", "join",
                     cost.join(block.out_shape, dists[0], dists[1]), None))
        tags.append(btag.get(id(block)))
        seqs.append(block.seq)

    def loss_row(name, shape, d):
        # recorded after every layer: the first node backward runs
        rows.append((name, "loss", cost.loss(shape, d), None))
        tags.append(None)
        seqs.append(math.inf)

    out = graph.traverse(dist, one, join, fork)
    loss_row("(loss)", graph.out_shape, out)
    return (rows, seqs) if detail else _merge_parallel(rows, tags, seqs, graph)


def _branch_tag(block, i, plan, world, btag, parallel_branches):
    """The group tag of branch ``i``'s fork move and cat share: the block's own branch if
    it runs in parallel, else that of the branch the block lies in."""
    if id(block) in btag:
        return btag[id(block)]
    return (id(block), i) if i in parallel_branches(block, plan, world) else None


def _merge_parallel(rows, tags, seqs, graph) -> tuple:
    """Each group of parallel branches as one row at its first row's place: the fields of
    the slowest branch, the largest branch memory and workspace. Returns ``(rows,
    seqs)``."""
    names = {id(b): b.name for b in graph.blocks()}
    groups: dict = {}
    for row, tag in zip(rows, tags):
        if tag is not None:
            groups.setdefault(tag[0], {}).setdefault(tag[1], []).append(row[2])
    out, oseq, done = [], [], set()
    for row, tag, q in zip(rows, tags, seqs):
        if tag is None:
            out.append(row)
            oseq.append(q)
        elif tag[0] not in done:
            done.add(tag[0])
            out.append((f"{names[tag[0]]}.(placed)", "placed", _slowest(groups[tag[0]]), None))
            oseq.append(q)
    return out, oseq


def _slowest(branches: dict):
    """One LayerCost for branches that run at the same time on disjoint ranks."""
    from .costs import LayerCost
    sums = {}
    for i, cs in branches.items():
        c = LayerCost()
        for x in cs:
            for f in ("compute_fwd", "compute_bwd", "comm_fwd", "comm_bwd", "sync", "update",
                      "bytes", "sync_bytes", "mem"):
                setattr(c, f, getattr(c, f) + getattr(x, f))
            c.work = max(c.work, x.work)
        sums[i] = c
    slow = max(sums.values(), key=lambda c: c.time)
    out = LayerCost(**{k: v for k, v in vars(slow).items()})
    out.mem = max(c.mem for c in sums.values())
    out.work = max(c.work for c in sums.values())
    return out


def _bucket_row(after, parts, seconds) -> dict:
    """One GradientSync bucket for :func:`simulate`'s result: sent when the backward of
    layer ``after`` ended (``"(wait)"``: when the step waited), its gradients' bytes on
    the first evaluated rank, and its allreduce seconds."""
    return {"after": after, "params": len(parts),
            "bytes": int(round(sum(_raw_bytes(p[0]) for p in parts))), "seconds": seconds}


def _raw_bytes(ev) -> float:
    """Bytes of the gradient behind an allreduce event on ``p`` ranks (GradientSync fills
    its buckets by these): the event counts a ring's 2(p-1)/p of them (exact on 2 ranks,
    within p elements otherwise)."""
    p = len(ev.group)
    return max(ev.sent, ev.recv) * p / (2.0 * (p - 1))


def additive_time(cost, plan) -> float:
    return sum(c.time for _, _, c, _ in walk(cost, plan))


def plan_memory(cost, plan, input_dist=None) -> int:
    """Bytes per rank: parameters with gradients and optimizer state, what backward keeps,
    plus the largest transient workspace."""
    rows = walk(cost, plan, input_dist=input_dist)
    return sum(c.mem for _, _, c, _ in rows) + max((c.work for _, _, c, _ in rows), default=0)


def simulate(cost, plan, overlap: bool = True, input_dist=None, local_bn=False) -> dict:
    """Predicted step of ``plan``: ``{"step_s", "compute_s", "comm_s", "sync_s",
    "exposed_sync_s", "update_s", "memory", "layers": [...], "buckets": [...]}``
    (``buckets``: GradientSync's allreduces in the order sent, ``{"after", "params",
    "bytes", "seconds"}``; empty when ``cost.bucket_bytes`` is None). ``local_bn``: the
    batch-norm layers' own communication (their statistics allreduces) left out, as data
    parallelism with per-rank batch statistics runs (distconv always reduces them; a
    lower bound for judging a data-parallel baseline)."""
    rows, seqs = _walk(cost, plan, input_dist=input_dist)

    def comm(kind, c, which):
        return 0.0 if local_bn and kind == "bn" else getattr(c, which)
    t = 0.0
    for _, k, c, _ in rows:
        t += c.compute_fwd + comm(k, c, "comm_fwd")
    stream = 0.0
    exposed = 0.0
    sync_s = 0.0
    policy = None
    if cost.bucket_bytes is not None:
        from ..optim import BucketPolicy
        policy = BucketPolicy(cost.bucket_bytes, overlap)
    buckets = []
    for name, k, c, _ in (rows[i] for i in backward_order(rows, seqs)):
        t += c.compute_bwd + comm(k, c, "comm_bwd")
        if c.sync <= 0:
            continue
        if policy is not None and c.sync_events:
            # GradientSync: each gradient joins its replica group's bucket as its layer's
            # backward ends; a full bucket starts at once on the allreduce stream
            for parts in zip(*c.sync_events):
                ev = parts[0]
                if len(ev.group) <= 1:
                    continue
                full = policy.add((c.sync_grid, ev.group), parts, _raw_bytes(ev))
                if full:
                    dt = cost.bucket_time(full)
                    stream = max(stream, t) + dt
                    sync_s += dt
                    buckets.append(_bucket_row(name, full, dt))
            continue
        sync_s += c.sync
        if overlap:
            stream = max(stream, t) + c.sync
        else:
            t += c.sync
            exposed += c.sync
    if policy is not None:  # the buckets left are sent when the step waits for them
        for _, parts in policy.rest():
            dt = cost.bucket_time(parts)
            stream = max(stream, t) + dt
            sync_s += dt
            buckets.append(_bucket_row("(wait)", parts, dt))
    if stream > t:
        exposed += stream - t
        t = stream
    update = sum(c.update for _, _, c, _ in rows)
    t += update
    layers = [{"name": n, "kind": k, "strategy": st,
               "compute_s": c.compute_fwd + c.compute_bwd,
               "comm_s": c.comm_fwd + c.comm_bwd, "sync_s": c.sync,
               "bytes": c.bytes, "sync_bytes": c.sync_bytes, "memory": c.mem}
              for n, k, c, st in rows]
    return {"step_s": t,
            "compute_s": sum(c.compute_fwd + c.compute_bwd for _, _, c, _ in rows),
            "comm_s": sum(c.comm_fwd + c.comm_bwd for _, _, c, _ in rows),
            "sync_s": sync_s, "exposed_sync_s": exposed,
            "update_s": update, "memory": plan_memory(cost, plan, input_dist), "layers": layers,
            "buckets": buckets}
