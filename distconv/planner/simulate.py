"""Step time of a plan: an additive total and a replay with overlapped gradient allreduces.

:func:`walk` lists every layer and join of the graph in execution order with its
:class:`.costs.LayerCost` under ``plan`` (a block's branches run one after another on all
ranks; a cat join is one row per branch, its share of the concatenation).
:func:`additive_time` sums them (what the search minimises). :func:`simulate` replays
one training step as FlexFlow's task-graph simulator does, with one compute stream and
one stream for gradient allreduces:

* forward: each layer's local compute, then its (blocking) collectives, in order;
* backward, in reverse: compute then blocking collectives; when a layer's backward ends
  its gradient allreduces are queued on the allreduce stream (``overlap=True``) and run
  one after another while later layers compute, or run at once, blocking, when
  ``overlap=False`` (MPI without asynchronous progress, or ``--no-overlap``);
* the step ends when both streams are done, plus the optimizer step.
"""
from __future__ import annotations


def walk(cost, plan: dict) -> list:
    """``[(name, kind, LayerCost, strategy or None), ...]`` in execution order."""
    graph = cost.graph
    rows = []
    first = next(layer for layer in graph.layers() if layer.strategic)
    missing = [n for n in graph.strategic_names() if n not in plan]
    if missing:
        raise ValueError(f"the plan has no strategy for layers {missing}")
    dist = cost.input_dist(plan[first.name])

    def one(layer, d):
        st = tuple(plan[layer.name]) if layer.strategic else None
        c = cost.layer(layer, st, d)
        rows.append((layer.name, layer.kind, c, st))
        return c.out_dist

    def join(block, *dists):
        if block.op == "cat":  # one row per branch: its share of the concatenation
            for i, d in enumerate(dists):
                rows.append((f"{block.name}.(cat {i})" if block.name else f"(cat {i})",
                             "cat", cost.cat_part(block, i, d, dists[0]), None))
            return
        rows.append((block.name + ".(join)" if block.name else "(join)", "join",
                     cost.join(block.out_shape, dists[0], dists[1]), None))

    graph.traverse(dist, one, join)
    return rows


def additive_time(cost, plan) -> float:
    return sum(c.time for _, _, c, _ in walk(cost, plan))


def plan_memory(cost, plan) -> int:
    """Bytes per rank: parameters with gradients and optimizer state, what backward keeps,
    plus the largest transient workspace."""
    rows = walk(cost, plan)
    return sum(c.mem for _, _, c, _ in rows) + max((c.work for _, _, c, _ in rows), default=0)


def simulate(cost, plan, overlap: bool = True) -> dict:
    """Predicted step of ``plan``: ``{"step_s", "compute_s", "comm_s", "sync_s",
    "exposed_sync_s", "update_s", "memory", "layers": [...]}``."""
    rows = walk(cost, plan)
    t = 0.0
    for _, _, c, _ in rows:
        t += c.compute_fwd + c.comm_fwd
    stream = 0.0
    exposed = 0.0
    for _, _, c, _ in reversed(rows):
        t += c.compute_bwd + c.comm_bwd
        if c.sync > 0:
            if overlap:
                stream = max(stream, t) + c.sync
            else:
                t += c.sync
                exposed += c.sync
    if overlap and stream > t:
        exposed = stream - t
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
            "sync_s": sum(c.sync for _, _, c, _ in rows), "exposed_sync_s": exposed,
            "update_s": update, "memory": plan_memory(cost, plan), "layers": layers}
