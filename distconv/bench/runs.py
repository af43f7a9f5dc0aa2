"""Model set-up shared by the scaling, paired and PyTorch-comparison scripts."""
from __future__ import annotations

from ..selfrank import self_strategy  # noqa: F401  (the scripts' 1-rank strategy)
from ..planner.strategies import as_strategy


def input_distribution(model):
    """Where the model's input must arrive: its first conv's input distribution (the
    activation layout of that layer's strategy, which is what ``graph_events`` assumes)."""
    first = model.conv1 if hasattr(model, "conv1") else model[0]
    return first.input_distribution


def plan_and_predict(comm, model, x_shape, fixed_plan=None, overlap=True, bucket_bytes=None):
    """Calibrate the machine (all ranks), then on rank 0 search a plan (``fixed_plan is
    None``: strategy ``auto``) or take ``fixed_plan``, and simulate its step; the other
    ranks wait without spinning. Returns ``(plan, predicted, machine notes)`` on every rank:
    ``plan`` ``{layer: (s, c, f)}``, ``predicted`` the simulated step's ``step_s``,
    ``compute_s``, ``comm_s``, ``sync_s``, ``exposed_sync_s`` and ``update_s``.
    ``bucket_bytes``: the run reduces its gradients with ``GradientSync`` buckets of that
    size; None: with ``opt.step()``'s ``sync_gradients``, one allreduce per parameter."""
    from ..planner.auto import MEASURE_ROUNDS, default_cache_path, plan_model
    from ..planner.compute import ComputeModel
    from ..planner.costs import CostModel
    from ..planner.graph import trace
    from ..planner.machine import calibrate
    from ..planner.simulate import simulate
    machine = calibrate(comm)
    res = None
    if comm.rank == 0:
        compute = ComputeModel(cache_path=default_cache_path(), threads=1,
                               rounds=MEASURE_ROUNDS)
        if fixed_plan is None:
            r = plan_model(model, x_shape, comm.size, machine, compute, overlap=overlap,
                           bucket_bytes=bucket_bytes)
            plan, pred = r["plan"], r["predicted"]
        else:
            plan = fixed_plan
            pred = simulate(CostModel(trace(model, x_shape), comm.size, machine, compute,
                                      bucket_bytes=bucket_bytes), plan, overlap=overlap)
        if compute.measured:
            compute.save()
        keys = ("step_s", "compute_s", "comm_s", "sync_s", "exposed_sync_s", "update_s")
        res = ({k: as_strategy(v) for k, v in plan.items()}, {k: pred[k] for k in keys},
               machine.notes)
    comm.idle_barrier()
    return comm.allgather_obj(res)[0]
