"""The worker side of ``scripts/scaling.py``: one point (rank count x strategy) timed in
one MPI job (the script's docstring says what a point measures).

* :func:`build_model`: one ResNet ``BasicBlock(C, C)`` or two conv-BN-ReLU layers, C x C;
* :func:`train_step`: forward, backward from ``dy`` and the gradient sync;
* :func:`model_bytes`: the bytes of that step on one rank, from the step itself run
  shape-only;
* :func:`worker`: the whole point -> rank 0 writes its JSON record.

A plan here is ``{layer name: (sample, channel, filter)}``.
"""
from __future__ import annotations

import json
import time

from .runs import input_distribution, plan_and_predict


def build_model(args, st):
    """The model under strategy ``st`` on every layer (``set_strategy`` may change it later)."""
    from distconv import nn
    from distconv.models.resnet import BasicBlock
    C = args.channels
    if args.model == "block":
        return BasicBlock(C, C, strategy=st)
    layers = []
    for _ in range(2):
        layers += [nn.Conv2d(C, C, 3, padding=1, bias=False, strategy=st),
                   nn.BatchNorm2d(C, strategy=st), nn.ReLU()]
    return nn.Sequential(*layers)


def train_step(model, x, dy, sync):
    """One worker step: forward, backward from ``dy``, and the overlapped gradient sync."""
    model(x)
    model.backward(dy)
    sync.wait()


def model_bytes(model, x_shape, plan, nranks, rank, bucket_bytes=4 << 20,
                overlap=True) -> dict:
    """Bytes of one worker step on ``rank`` of ``nranks`` under ``plan`` (no MPI, no data):
    :func:`train_step` itself run shape-only (:class:`distconv.trace.shape_only`), so the
    layers, the joins and ``GradientSync``'s buckets are priced by the code that runs.
    ``{"sent", "recv", "grad_sent", "grad_recv"}`` (grad: the bucketed allreduces)."""
    import numpy as np
    from distconv import DistTensor
    from distconv.meta import MetaArray
    from distconv.optim import GradientSync
    from distconv.trace import shape_only
    ctx = shape_only(model, nranks, rank, {k: Strategy_of(v) for k, v in plan.items()})
    with ctx as w:
        x = DistTensor.from_global(ctx.input(x_shape, np.float32), input_distribution(model))
        y = model(x)
        dy = DistTensor(MetaArray(y.distribution.local_shape(y.shape), y.dtype),
                        y.distribution.replace(pending=()), y.shape)
        sync = GradientSync(model, bucket_bytes=bucket_bytes, overlap=overlap)
        w.reset_stats()
        try:
            train_step(model, x, dy, sync)
        finally:
            sync.remove()
        st = w.stats()
    grad = st.get("iallreduce", {"bytes_sent": 0, "bytes_recv": 0})
    return {"sent": st["total"]["bytes_sent"], "recv": st["total"]["bytes_recv"],
            "grad_sent": grad["bytes_sent"], "grad_recv": grad["bytes_recv"]}


def Strategy_of(v):
    """A plan entry ``(s, c, f)`` (or a Strategy / its text) as a Strategy."""
    from distconv import Strategy
    if isinstance(v, (tuple, list)):
        return Strategy(*v)
    return v


def grid_text(plan, names) -> str:
    """``"SxCxF"`` if every layer has the same strategy, else ``"layer:SxCxF ..."``."""
    txt = {n: "x".join(str(v) for v in plan[n]) for n in names}
    if len(set(txt.values())) == 1:
        return next(iter(txt.values()))
    return " ".join(f"{n}:{t}" for n, t in txt.items())


def _kind_bytes(st0, st1, pred):
    """``[sent, recv]`` between two ``stats()`` snapshots, over the kinds ``pred`` keeps."""
    return [sum(v[f] - st0.get(k, {}).get(f, 0) for k, v in st1.items()
                if k != "total" and pred(k)) for f in ("bytes_sent", "bytes_recv")]


def run_steps(comm, model, x, dy, sync, prof, warmup, steps):
    """``warmup`` + ``steps`` steps under the profiler, each after a barrier ->
    ``{"steps": timed seconds, "sent", "recv", "gsent", "grecv": bytes per step}``
    (warm-up steps included in the bytes; g: the gradient allreduces)."""
    out = {"steps": [], "sent": [], "recv": [], "gsent": [], "grecv": []}
    params = model.parameters()
    for i in range(warmup + steps):
        for q in params:
            q.grad = None
        comm.barrier()
        st0 = comm.stats()
        prof.step_begin()
        t0 = time.perf_counter()
        train_step(model, x, dy, sync)
        t1 = time.perf_counter()
        prof.step_end()
        st1 = comm.stats()
        a, b = _kind_bytes(st0, st1, lambda k: True)
        ga, gb = _kind_bytes(st0, st1, lambda k: k == "iallreduce")
        out["sent"].append(a)
        out["recv"].append(b)
        out["gsent"].append(ga)
        out["grecv"].append(gb)
        if i >= warmup:
            out["steps"].append(t1 - t0)
    return out


def mismatches(got, mb) -> list:
    """The steps whose bytes differ from the model ``mb`` (of :func:`model_bytes`)."""
    return [f"step {i}: sent {a} recv {b} (gradient sync {c}/{d}); model sent {mb['sent']} "
            f"recv {mb['recv']} (gradient sync {mb['grad_sent']}/{mb['grad_recv']})"
            for i, (a, b, c, d) in enumerate(zip(got["sent"], got["recv"], got["gsent"],
                                                 got["grecv"]))
            if (a, b, c, d) != (mb["sent"], mb["recv"], mb["grad_sent"], mb["grad_recv"])]


def point_record(args, allr, p, n, plan, names, predicted, machine_notes, summ) -> dict:
    """Rank 0: the point's JSON record from every rank's figures ``allr``."""
    import numpy as np
    from distconv.planner.planfile import plan_to_json
    step_max = [max(r["steps"][i] for r in allr) for i in range(args.steps)]
    comm_max = [max(r["comm"][i] for r in allr) for i in range(args.steps)]
    exp_max = [max(r["exposed"][i] for r in allr) for i in range(args.steps)]
    q1, med, q3 = (float(v) for v in np.percentile(step_max, [25, 50, 75]))
    cmed = float(np.median(comm_max))
    grad = max(r["grad_sent"] for r in allr)
    dpg = max(r["dp"]["grad_sent"] for r in allr)
    mismatch = {str(rk): r["mismatch"] for rk, r in enumerate(allr) if r["mismatch"]}
    return {"ranks": p, "strategy": args.strategy, "grid": grid_text(plan, names),
            "plan": plan_to_json({k: plan[k] for k in names}), "mode": args.mode,
            "model": args.model, "overlap": args.overlap, "bucket_kb": args.bucket_kb,
            "global_batch": n, "channels": args.channels, "size": args.size,
            "steps": args.steps, "step_s": med, "step_iqr_s": q3 - q1,
            "predicted_step_s": predicted["step_s"] - predicted["update_s"],
            "predicted": predicted, "machine_notes": machine_notes,
            "images_per_s": n / med, "compute_s": med - cmed, "comm_s": cmed,
            "exposed_comm_s": float(np.median(exp_max)),
            "bytes_sent_per_rank": max(r["bytes_sent"] for r in allr),
            "model_bytes_sent_per_rank": max(r["model"]["sent"] for r in allr),
            "grad_bytes_per_rank": grad,
            "model_grad_bytes_per_rank": max(r["model"]["grad_sent"] for r in allr),
            "dp_grad_bytes_per_rank": dpg,
            "grad_bytes_ratio_vs_dp": grad / dpg if dpg else None,
            "bytes_match": not mismatch, "bytes_mismatch": mismatch,
            "bytes_per_rank": [{"measured_sent": r["bytes_sent"], "model": r["model"],
                                "dp_model": r["dp"]} for r in allr],
            "peak_rss_mb": max(r["rss_mb"] for r in allr),
            "step_s_reps": step_max, "comm_s_reps": comm_max, "exposed_s_reps": exp_max,
            "profile_rank0": summ}


def worker(args):
    """One point on this MPI job: plan (``auto``) or take the uniform strategy, predict,
    model the bytes, run the steps; rank 0 writes ``args.json`` and prints the profile."""
    import resource

    import numpy as np
    from distconv import DistTensor, Strategy, manual_seed
    from distconv.comm import world
    from distconv.optim import GradientSync
    from distconv.planner.auto import data_parallel
    from distconv.planner.graph import trace
    from distconv.planner.planfile import to_strategies
    from distconv.profile import Profiler
    try:
        from threadpoolctl import threadpool_limits
        threadpool_limits(1)
    except ImportError:
        pass
    comm = world()
    p = comm.size
    auto = args.strategy.strip().lower() == "auto"
    st = Strategy() if auto else Strategy.parse(args.strategy)
    s = p if auto else st.resolve(p)[0]
    n = args.batch if args.mode == "strong" else args.batch * s
    x_shape = (n, args.channels, args.size, args.size)
    manual_seed(args.seed)
    model = build_model(args, st)
    graph = trace(model, x_shape)
    names = graph.strategic_names()
    fixed = None if auto else {k: st.resolve(p) for k in names}
    plan, predicted, machine_notes = plan_and_predict(comm, model, x_shape, fixed,
                                                       overlap=args.overlap == "on",
                                                       bucket_bytes=args.bucket_kb << 10)
    if auto:
        model.set_strategy(to_strategies(plan))
    overlap = args.overlap == "on"
    bucket = args.bucket_kb << 10
    mb = model_bytes(model, x_shape, plan, p, comm.rank, bucket, overlap)
    dp = model_bytes(model, x_shape, data_parallel(graph, p), p, comm.rank, bucket, overlap)

    rng = np.random.default_rng(args.seed)
    dtype = np.float32
    x = DistTensor.from_global(rng.standard_normal(x_shape).astype(dtype),
                               input_distribution(model))
    y = model(x)
    dy = DistTensor.from_global(rng.standard_normal(y.shape).astype(dtype), y.distribution)
    sync = GradientSync(model, bucket_bytes=bucket, overlap=overlap)
    prof = Profiler(model, sync=sync)  # after GradientSync: its backward hooks are timed
    got = run_steps(comm, model, x, dy, sync, prof, args.warmup, args.steps)
    summ = prof.summary(skip=args.warmup)
    mine = {"steps": got["steps"], "comm": [x["comm_s"] for x in summ["steps"]],
            "exposed": [x["exposed_comm_s"] for x in summ["steps"]],
            "bytes_sent": max(got["sent"]), "grad_sent": max(got["gsent"]), "model": mb,
            "dp": dp, "mismatch": mismatches(got, mb)[:3],
            "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0}
    allr = comm.allgather_obj(mine)
    if comm.rank == 0:
        rec = point_record(args, allr, p, n, plan, names, predicted, machine_notes, summ)
        with open(args.json, "w") as fh:
            json.dump(rec, fh, indent=1)
        print(prof.table(skip=args.warmup), flush=True)
    return 0
