"""The model, plans and per-plan step of ``scripts/bench_planner.py``.

* :func:`build_model`: the wide ResNet (CIFAR stem) or :func:`inception_net` (IncNet:
  blocks of three towers joined by ``dc.cat``) of the benchmark's arguments.
* :func:`hand_plans`: the hand-written plans the planner's own plan is compared with.
* :func:`calib_sizes`, :func:`predicted_phases`, :func:`plan_text`: message sizes to
  calibrate with, the predicted phases of a plan and its compact text.
* :func:`kinds_bytes`, :func:`predicted_bytes`: bytes per collective kind, measured
  (from ``Communicator.stats()`` deltas) and predicted (``graph_events``).
* :class:`Case`: one plan's model instance, optimizer and inputs; its timed step and
  its bytes step.

A plan here is ``{layer name: (sample, channel, filter)}`` in graph order.
"""
from __future__ import annotations

import time

from .stats import stats_delta

#: collective kinds whose nonblocking variant ("i" + kind) is counted with the kind
KINDS = ("allreduce", "allgather", "reduce_scatter", "alltoall")


# ------------------------------------------------------------------ model and plans
def inception_net(width, nblocks, classes, in_channels=3):
    """:class:`IncNet`: stem conv3x3-bn-relu, ``nblocks`` blocks of three towers joined by
    dc.cat."""
    import distconv as dc
    from distconv import nn

    class Block(nn.Module):
        def __init__(self, w):
            super().__init__()
            q, h = w // 4, w // 2
            self.b1 = nn.Conv2d(w, q, 1)
            self.b2 = nn.Sequential(nn.Conv2d(w, h, 1), nn.ReLU(), nn.Conv2d(h, h, 3, padding=1))
            self.b3 = nn.Sequential(nn.AvgPool2d(3, stride=1, padding=1), nn.Conv2d(w, q, 1))
            self.bn = nn.BatchNorm2d(2 * q + h)
            self.relu = nn.ReLU()

        def forward(self, x):
            return self.relu(self.bn(dc.cat([self.b1(x), self.b2(x), self.b3(x)])))

    class IncNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1, bias=False),
                                      nn.BatchNorm2d(width), nn.ReLU())
            self.blocks = nn.Sequential(*[Block(width) for _ in range(nblocks)])
            self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
            self.fc = nn.Linear(width, classes)

        def forward(self, x):
            return self.fc(self.head(self.blocks(self.stem(x))))
    return IncNet()


def build_model(args):
    """The benchmark's model from ``args`` (``model``, ``width``, ``blocks``, ``classes``,
    ``seed``), seeded by ``manual_seed(args.seed)``."""
    from distconv.nn import manual_seed
    manual_seed(args.seed)
    if getattr(args, "model", "resnet") == "inception":
        return inception_net(args.width, sum(args.blocks), args.classes)
    from distconv.models.resnet import BasicBlock, ResNet
    return ResNet(BasicBlock, list(args.blocks), num_classes=args.classes, in_channels=3,
                  stem="cifar", base_width=args.width)


def _stage(name):
    """0 for the stem, i for layer<i>... (ResNet) or blocks.<i-1>... (IncNet), 99 for fc."""
    if name.startswith("layer"):
        return int(name[5:].split(".")[0])
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return 0 if name in ("conv1", "bn1") or name.startswith("stem.") else 99


def _block_part(n):
    """"conv1"/"bn1" of a block -> 1, "conv2"/"bn2" -> 2, downsample -> 3; IncNet: a
    tower's first conv -> 1, the 3x3 after it and the block's batch norm -> 2."""
    last = n.split(".")
    if "downsample" in last:
        return 3
    if n.startswith("blocks."):
        return 2 if last[2:] == ["b2", "2"] or last[-1] == "bn" else 1
    return 1 if last[-1] in ("conv1", "bn1") else 2


def hand_plans(graph, p):
    """``[(label, {name: (s, c, f)})]``: the uniform sample, channel and filter splits (on 4
    ranks the 2x2 mixes too) and per-layer mixes by stage, by position in the block and,
    for IncNet, by tower."""
    names = graph.strategic_names()
    S, C, F = (p, 1, 1), (1, p, 1), (1, 1, p)
    nst = max((_stage(n) for n in names if _stage(n) not in (0, 99)), default=1)

    def rule(fn):
        return {n: fn(n) for n in names}

    def late(n):  # the second half of the stages and the fc
        s = _stage(n)
        return s > max(1, nst // 2) or s == 99

    plans = [("sample", rule(lambda n: S)), ("channel", rule(lambda n: C)),
             ("filter", rule(lambda n: F))]
    if p == 4:
        for st in ((2, 2, 1), (2, 1, 2), (1, 2, 2)):
            plans.append((f"s{st[0]}c{st[1]}f{st[2]}", rule(lambda n, st=st: st)))
    plans += [
        ("stem-sample+filter", rule(lambda n: S if _stage(n) == 0 else F)),
        ("stem-sample+channel", rule(lambda n: S if _stage(n) == 0 else C)),
        ("sample-early+filter-late", rule(lambda n: F if late(n) else S)),
        ("filter-early+channel-late", rule(lambda n: C if late(n) else F)),
        # filter then channel within each block: the filter conv's output is split on C
        # exactly as the channel conv wants its input (the paper's pairing)
        ("alternate-filter/channel", rule(
            lambda n: F if _stage(n) == 0 else C if _stage(n) == 99 else
            (F if _block_part(n) == 1 else C))),
    ]
    if any(n.startswith("blocks.") for n in names):  # IncNet: towers of one block differ
        def tower(n):
            t = n.split(".")[2] if n.count(".") >= 2 else ""
            return {"b1": C, "b2": F, "b3": C}.get(t, S)
        plans.append(("towers-channel/filter/channel", rule(tower)))
    return plans


def calib_sizes(graph, item=4):
    """Message sizes to calibrate with: 4 KiB, 64 KiB, ... (x16) up to the first power of
    two at least as large as the model's largest message (a weight gradient or a whole
    activation), and at least 4 MiB."""
    big = 0
    for layer in graph.layers():
        n = 1
        for d in layer.out_shape:
            n *= d
        big = max(big, n * item, layer.num_params * item)
    top = max(4 << 20, 1 << max(0, (big - 1).bit_length()))
    sizes, s = [], 4 << 10
    while s < top:
        sizes.append(s)
        s *= 16
    return tuple(sizes) + (top,)


def predicted_phases(cost, plan):
    """Predicted forward / loss / backward / sync / update seconds of ``plan`` (blocking
    sync; the loss: its collectives, forward and backward)."""
    from distconv.planner.simulate import walk
    rows = walk(cost, plan)
    model = [c for _, k, c, _ in rows if k != "loss"]
    return {"forward": sum(c.compute_fwd + c.comm_fwd for c in model),
            "loss": sum(c.time for _, k, c, _ in rows if k == "loss"),
            "backward": sum(c.compute_bwd + c.comm_bwd for c in model),
            "sync": sum(c.sync for _, _, c, _ in rows),
            "update": sum(c.update for _, _, c, _ in rows)}


def plan_text(plan):
    """Compact per-layer text: runs of equal strategies."""
    out, prev, start = [], None, None
    for n, st in plan.items():
        if st != prev:
            if prev is not None:
                out.append(f"{start}..: s{prev[0]}c{prev[1]}f{prev[2]}")
            prev, start = st, n
    if prev is not None:
        out.append(f"{start}..: s{prev[0]}c{prev[1]}f{prev[2]}")
    return "; ".join(out)


# ------------------------------------------------------------------ bytes
def _kind(k):
    return "alltoall" if k == "alltoallv" else k


def _add_bytes(into, more):
    """Add ``more``'s ``{kind: [sent, recv]}`` into ``into`` (in place)."""
    for k, v in more.items():
        e = into.setdefault(k, [0, 0])
        e[0] += v[0]
        e[1] += v[1]
    return into


def kinds_bytes(delta):
    """``{kind: [sent, recv]}`` (nonzero only) of a stats delta; blocking and nonblocking
    variants of a kind are counted together."""
    out = {}
    for k, d in delta.items():
        k = _kind(k[1:] if k.startswith("i") and k[1:] in KINDS else k)
        _add_bytes(out, {k: [d["bytes_sent"], d["bytes_recv"]]})
    return {k: v for k, v in out.items() if v[0] or v[1]}


def predicted_bytes(graph, plan, rank, item):
    """``(model, loss)``, each ``{kind: [sent, recv]}`` (nonzero only), that ``rank`` sends
    and receives in one step of ``plan`` by ``graph_events``: the model's forward, backward
    and gradient sync, and the cross-entropy loss's."""
    from distconv.planner.events import graph_events
    model, loss = {}, {}
    for name, ev in graph_events(graph, plan, rank, item, loss=True).items():
        out = loss if name == "(loss)" else model
        for e in ev["forward"] + ev["backward"] + ev["sync"]:
            _add_bytes(out, {_kind(e.kind): [e.sent, e.recv]})
    return tuple({k: v for k, v in out.items() if v[0] or v[1]} for out in (model, loss))


# ------------------------------------------------------------------ one plan
class Case:
    """One plan: its model instance, optimizer, inputs and this rank's step records.

    ``x_glob``: the global input, N x 3 x S x S float32, the same on every rank;
    ``labels``: N class indices.
    """

    def __init__(self, label, plan, args, x_glob, labels):
        from distconv.optim import SGD
        from distconv.planner.compute import SGD_SETTINGS
        from distconv.planner.planfile import to_strategies
        from distconv.tensor import DistTensor
        import distconv as dc
        self.label, self.plan = label, plan
        self.model = build_model(args)
        self.model.set_strategy(to_strategies(plan))
        self.params = list(self.model.parameters())
        s = SGD_SETTINGS
        self.opt = SGD(self.params, lr=s["lr"], momentum=s["momentum"],
                       weight_decay=s["weight_decay"], nesterov=s["nesterov"])
        self.crit = dc.nn.CrossEntropyLoss()
        first = next(m for _, m in self.model.named_modules() if isinstance(m, dc.nn.Conv2d))
        self.x = DistTensor.from_global(x_glob, first.input_distribution)
        self.labels = labels
        self.recs = []

    def step(self, comm, record=True):
        """One training step after a barrier; with ``record``, its wall time, the time the
        OS took from this rank (wall - CPU) and its phases go to ``self.recs``."""
        from distconv.nn import sync_gradients
        self.opt.zero_grad()
        comm.barrier()
        c0 = time.process_time()
        t0 = time.perf_counter()
        y = self.model(self.x)
        t1 = time.perf_counter()
        loss = self.crit(y, self.labels)
        dy = self.crit.backward()
        t2 = time.perf_counter()
        self.model.backward(dy)
        t3 = time.perf_counter()
        sync_gradients(self.params)
        t4 = time.perf_counter()
        self.opt.step()
        t5 = time.perf_counter()
        c1 = time.process_time()
        if record:
            self.recs.append({"step": t5 - t0, "lost": max(0.0, (t5 - t0) - (c1 - c0)),
                              "phases": {"forward": t1 - t0, "loss": t2 - t1,
                                         "backward": t3 - t2, "sync": t4 - t3,
                                         "update": t5 - t4}})
        return loss

    def bytes_step(self, comm):
        """One step with stats snapshots: ``(model bytes, loss bytes)`` per kind."""
        from distconv.nn import sync_gradients
        self.opt.zero_grad()
        comm.barrier()
        s0 = comm.stats()
        y = self.model(self.x)
        s1 = comm.stats()
        self.crit(y, self.labels)
        dy = self.crit.backward()
        s2 = comm.stats()
        self.model.backward(dy)
        sync_gradients(self.params)
        s3 = comm.stats()
        self.opt.step()
        s4 = comm.stats()
        model = _add_bytes(kinds_bytes(stats_delta(s1, s0)), kinds_bytes(stats_delta(s3, s2)))
        loss = _add_bytes(kinds_bytes(stats_delta(s2, s1)), kinds_bytes(stats_delta(s4, s3)))
        return model, loss
