"""Op families of the compute model, the work of one pass, and fitted-line rates.

A *family* is one pass of one op (``conv_fwd``, ``bn_bwd``, ...), of kind ``flops``
(conv and linear: floating point operations) or ``memory`` (bytes touched). A time is
predicted as ``t0 + work / rate`` (:func:`work`, :func:`_fit_line`); cache keys hold an
op's arguments as ``k=v`` pairs (:func:`_fmt`, :func:`_parse_args`).
"""
from __future__ import annotations

import math

import numpy as np

from .. import ops

# family -> (group, kind). A family is one pass of one op; kind "flops" or "memory".
FAMILIES = {
    "conv_fwd": ("conv", "flops"), "conv_bwd_data": ("conv", "flops"),
    "conv_bwd_filter": ("conv", "flops"),
    "linear_fwd": ("linear", "flops"), "linear_bwd_data": ("linear", "flops"),
    "linear_bwd_filter": ("linear", "flops"),
    "bn_fwd": ("bn", "memory"), "bn_bwd": ("bn", "memory"),
    "relu_fwd": ("relu", "memory"), "relu_bwd": ("relu", "memory"),
    "maxpool_fwd": ("maxpool", "memory"), "maxpool_bwd": ("maxpool", "memory"),
    "avgpool_fwd": ("avgpool", "memory"), "avgpool_bwd": ("avgpool", "memory"),
    "gap_fwd": ("global_avgpool", "memory"), "gap_bwd": ("global_avgpool", "memory"),
    # adaptive average pooling to more than 1x1 (AlexNet's 6x6, VGG's 7x7): an average
    # pool, so a machine file's "avgpool" rates apply to it too
    "adaptive_fwd": ("avgpool", "memory"), "adaptive_bwd": ("avgpool", "memory"),
    "add": ("add", "memory"),
    "update_sgd": ("update", "memory"), "update_adam": ("update", "memory"),
}
DEFAULT_RATES = {  # per kind; float32, one CPU core
    "flops": {"t0": 20e-6, "rate": 50e9},
    "memory": {"t0": 20e-6, "rate": 5e9},
}
DEFAULT_RATES_GPU = {  # per kind; CuPy on a V100-class device
    "flops": {"t0": 10e-6, "rate": 12e12},
    "memory": {"t0": 10e-6, "rate": 700e9},
}
MIN_POINTS = 3


def _fmt(v):
    return f"{v[0]}x{v[1]}" if isinstance(v, tuple) else str(int(v))


def _parse_args(s):
    out = {}
    for part in s.split(","):
        k, v = part.split("=")
        out[k] = tuple(int(t) for t in v.split("x")) if "x" in v else int(v)
    return out



def work(family, a, itemsize):
    """Work of one pass: flops (conv/linear) or bytes touched, from the key's args ``a``."""
    b = itemsize
    if family.startswith("conv"):
        ho, wo = ops.conv2d_output_hw(a["h"], a["w"], a["k"], a["s"], a["p"], a["d"])
        return 2.0 * a["n"] * a["f"] * a["c"] * a["k"][0] * a["k"][1] * ho * wo
    if family.startswith("linear"):
        return 2.0 * a["n"] * a["c"] * a["f"]
    if family.startswith(("maxpool", "avgpool")):
        ho, wo = ops.conv2d_output_hw(a["h"], a["w"], a["k"], a["s"], a["p"], (1, 1))
        nc = a["n"] * a["c"]
        return float(b * nc * (a["h"] * a["w"] + a["k"][0] * a["k"][1] * ho * wo))
    if family.startswith("gap"):
        return float(b * a["n"] * a["c"] * (a["h"] * a["w"] + 1))
    if family.startswith("adaptive"):
        # two batched GEMMs with the (ho, h) and (w, wo) bin matrices: forward reads x,
        # writes and reads the (h, wo) middle, writes y; backward the same from dy
        h, w, ho, wo = a["h"], a["w"], a["ho"], a["wo"]
        mid = h * wo if family == "adaptive_fwd" else ho * w
        return float(b * a["n"] * a["c"] * (h * w + 2 * mid + ho * wo))
    numel = a["numel"] if "numel" in a else a["n"] * a["c"] * a["h"] * a["w"]
    arrays = {"bn_fwd": 3, "bn_bwd": 5, "relu_fwd": 2, "relu_bwd": 3, "add": 3,
              "update_sgd": 5, "update_adam": 7}[family]
    return float(b * numel * arrays)


def _check_rate(name, r):
    if not isinstance(r, dict) or "t0" not in r or "rate" not in r:
        raise ValueError(f"rates[{name!r}] must be {{'t0': s, 'rate': per_s}}, got {r!r}")
    t0, rate = float(r["t0"]), float(r["rate"])
    if not (t0 >= 0 and rate > 0 and math.isfinite(t0)):
        raise ValueError(f"rates[{name!r}]: need t0 >= 0 and rate > 0, got {r!r}")
    return {"t0": t0, "rate": rate}


def _fit_line(points):
    """Non-negative (t0, 1/rate) minimising the relative error; None if no positive slope."""
    x = np.array([p[0] for p in points], float)
    t = np.array([p[1] for p in points], float)
    wt = 1.0 / np.maximum(t, 1e-12)  # rows scaled by 1/t: relative residuals
    A = np.stack([wt, x * wt], axis=1)
    y = np.ones_like(t)
    (a, s), *_ = np.linalg.lstsq(A, y, rcond=None)
    if a < 0 or s <= 0:  # optimum on a boundary: t0 = 0, or slope 0 (no use of work)
        s = float(A[:, 1] @ y / max(A[:, 1] @ A[:, 1], 1e-300))
        a0 = float(A[:, 0] @ y / (A[:, 0] @ A[:, 0]))
        if np.sum((A[:, 0] * a0 - y) ** 2) <= np.sum((A[:, 1] * s - y) ** 2):
            return None
        a = 0.0
    if not (s > 0 and math.isfinite(s)):
        return None
    return {"t0": float(a), "rate": float(1.0 / s)}
