"""Plan files: the per-layer JSON that ``scripts/train.py --strategy plan.json`` accepts.

Format (one object; only ``"plan"`` is required, and a bare ``{layer: strategy}`` object
is read as a plan too, which is what a user writes by hand)::

    {"plan": {"conv1": "sample=2,channel=1,filter=1",
              "layer1.0.conv1": "sample=1,channel=2,filter=1", ...},
     "predicted": {"step_s": ..., "memory": ..., "dp_step_s": ..., ...},
     "meta": {"model": "resnet50", "input_shape": [256, 3, 224, 224], "ranks": 1024,
              "machine": "v100_ib", ...}}

Strategy values are :meth:`distconv.Strategy.parse` texts naming all three of
``sample``, ``channel`` and ``filter`` (and ``ranks`` for a layer placed on some ranks,
e.g. ``"sample=1,channel=1,filter=2,ranks=0-1"``; ``meta.ranks`` is then the job's size),
or objects ``{"sample": s, "channel": c, "filter": f}``; layer names are those of
``model.named_modules()``.
"""
from __future__ import annotations

import json
import os

from ..atomic import write_text
from .strategies import as_strategy, parse_strategy, strategy_text, to_strategy


def plan_to_json(plan: dict) -> dict:
    """``{name: (s, c, f)}`` -> ``{name: "sample=s,channel=c,filter=f"}``."""
    return {str(k): strategy_text(as_strategy(v)) for k, v in plan.items()}


def plan_from_json(obj, where: str = "plan") -> dict:
    """A plan object (or a whole plan file's object) -> ``{name: (s, c, f)}``.

    ``ValueError`` naming ``where`` and the bad entry if it is not a plan.
    """
    world = None
    if isinstance(obj, dict) and isinstance(obj.get("plan"), dict):
        meta = obj.get("meta")
        if isinstance(meta, dict) and isinstance(meta.get("ranks"), int):
            world = meta["ranks"]
        obj = obj["plan"]
    if not isinstance(obj, dict) or not obj:
        raise ValueError(f"{where}: expected a JSON object mapping layer names to strategies, "
                         f"got {type(obj).__name__}{'' if obj else ' (empty)'}")
    out = {}
    for k, v in obj.items():
        try:
            out[str(k)] = parse_strategy(v, world)
        except (ValueError, TypeError) as e:
            raise ValueError(f"{where}: layer {k!r}: {e}") from None
    return out


def save_plan(path, plan: dict, predicted: dict | None = None, meta: dict | None = None) -> None:
    """Write a plan file atomically (temporary file, then rename: a crash leaves the old
    file or the new one, never half of one)."""
    doc = {"plan": plan_to_json(plan)}
    if predicted is not None:
        doc["predicted"] = predicted
    if meta is not None:
        doc["meta"] = meta
    write_text(path, json.dumps(doc, indent=1, sort_keys=False) + "\n")


def load_plan(path) -> dict:
    """Read a plan file -> ``{name: (s, c, f)}`` (``ValueError`` naming the file if bad)."""
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as fh:
            obj = json.load(fh)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read plan file {path!r}: {e}") from None
    return plan_from_json(obj, where=f"plan file {path!r}")


def to_strategies(plan: dict) -> dict:
    """``{name: (s, c, f)}`` -> ``{name: distconv.Strategy}`` for ``model.set_strategy``."""
    return {k: to_strategy(st) for k, st in plan.items()}
