"""What ``scripts/plan.py`` prints and writes besides the planner's own table.

``result`` below is :func:`distconv.planner.auto.plan_model`'s dict (``plan``: ``{layer:
(sample, channel, filter)}``, ``graph``, ``candidates``, ``mcmc``, ...); ``args`` is
plan.py's parsed command line.
"""
from __future__ import annotations

import datetime
import os
import shlex
import sys

from distconv.planner.strategies import as_strategy, strategy_short as short_strategy


def strategy_usage(result) -> list:
    """``[(strategy, {kind: count}), ...]`` of the plan, most used first."""
    kinds = {layer.name: layer.kind for layer in result["graph"].layers()}
    use: dict = {}
    for name, st in result["plan"].items():
        d = use.setdefault(as_strategy(st), {})
        k = kinds.get(name, "?")
        d[k] = d.get(k, 0) + 1
    return sorted(use.items(), key=lambda kv: (-sum(kv[1].values()), short_strategy(kv[0])))


def usage_text(result) -> str:
    parts = []
    for st, kinds in strategy_usage(result):
        n = sum(kinds.values())
        detail = ", ".join(f"{k} {v}" for k, v in sorted(kinds.items()))
        parts.append(f"{short_strategy(st)}: {n} layer{'s' if n != 1 else ''} ({detail})")
    return "; ".join(parts)


def mcmc_vs_dp(result) -> str:
    """What MCMC found against the DP search's plan (the fastest of its sync weights)."""
    run = result["mcmc"]
    dp = [t for n, t in (result.get("candidates") or {}).items() if n.startswith("search")]
    line = (f"MCMC {run['seconds']:.2f} s ({run['proposals']} proposals, {run['accepted']} "
            f"accepted): {run['step_s'] * 1e3:.3f} ms")
    if dp:
        line += (f" vs DP search {min(dp) * 1e3:.3f} ms "
                 f"({100 * (1 - run['step_s'] / min(dp)):+.2f}%)")
    line += f"; started from {run['start']} ({run['start_step_s'] * 1e3:.3f} ms)"
    return line + ("; MCMC plan returned" if run.get("returned") else "")


def fmt_bytes(n) -> str:
    """A memory limit in GiB or MiB (``None``: unlimited)."""
    if n is None:
        return "unlimited"
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def plan_meta(args, result, *, classes, shape, in_shape, ranks, machine, source, mode,
              threads, seconds) -> dict:
    """The plan file's ``meta``: the model as train.py must build it, the input, the
    target ranks and machine, the compute mode and the search settings."""
    from distconv.models import CNN_MODELS
    cnn = args.model in CNN_MODELS
    return {
        "model": args.model, "num_classes": classes,
        "width": args.width if args.model == "small_resnet" else None,
        "stem": (None if args.model == "small_resnet" or cnn
                 else ("cifar" if shape[2] <= 64 else "imagenet")),
        **({"width_divisor": args.width_divisor} if cnn else {}),
        **({"hidden": args.hidden} if cnn and args.model != "inception_v3" else {}),
        **({"aux_logits": not args.no_aux_logits} if args.model == "inception_v3" else {}),
        "input_shape": list(in_shape), "ranks": ranks, "machine": machine.name,
        "machine_source": source, "ranks_per_node": machine.ranks_per_node,
        "compute": mode, "threads": threads, "memory_limit": result["memory_limit"],
        "optimizer": args.optimizer, "dtype": args.dtype, "overlap": not args.no_overlap,
        "bucket_kb": args.bucket_kb,
        "plan_seconds": seconds, "chosen": result.get("chosen"),
        "command": shlex.join([os.path.basename(sys.executable)] + sys.argv),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def model_flags(args) -> str:
    """The train.py flags that build the same model as plan.py's arguments (leading
    space; empty for the defaults)."""
    from distconv.models import CNN_MODELS
    flags = f" --width {args.width}" if args.model == "small_resnet" and args.width != 16 else ""
    if args.model in CNN_MODELS:
        flags += f" --width-divisor {args.width_divisor}" if args.width_divisor != 1 else ""
        if args.model != "inception_v3" and args.hidden != 4096:
            flags += f" --hidden {args.hidden}"
        if args.model == "inception_v3" and args.no_aux_logits:
            flags += " --no-aux-logits"
    return flags
