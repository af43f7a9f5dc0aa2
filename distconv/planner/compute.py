"""Seconds of the LOCAL kernels one rank runs for its shard of a layer.

The compute half of the planner's cost model. Every method of
:class:`ComputeModel` takes local shard sizes (ints, after the strategy split)
and returns seconds; a shard with any zero extent costs 0.0.

**Measured times and the cache.** With ``measure=True`` a shape never seen
before is timed with the real kernels of :mod:`distconv.ops` on the backend
(NumPy, or CuPy with the device synchronised around every timed call) on
random inputs of ``dtype``: one untimed warm-up call, then the median of
``reps`` timed calls (``time.perf_counter``). On NumPy each timed call comes
after ``evict_bytes`` (default :data:`EVICT_BYTES`, 32 MiB) of writes that push
the core's caches out, as the other layers do between a layer's calls in a
training step (back-to-back calls find their data in cache: small and
memory-bound kernels then time up to 2x faster than they run in a step). With
one thread on NumPy, a call counts only if the OS left the core to it (wall
time within 5% of the process CPU time; more calls are made until ``reps``
such): a burst of other processes' load does not end up in the cache. Each
pass is one cache entry under a human-readable string key::

    op|arg=value,...|dtype|backend|t<threads>
    conv_fwd|n=4,c=64,h=28,w=28,f=64,k=3x3,s=1x1,p=1x1,d=1x1|float32|numpy|t1

``threads`` is the BLAS thread count the time was taken with (``t0`` on
CuPy, where it does not apply). ``save()`` writes the cache atomically to
``cache_path`` as JSON ``{"format": 1, "entries": {key: seconds}, "rates":
{"dtype|backend|t<threads>": rates}, "timing": {"dtype|backend|t<threads>":
"evict<bytes>"}}`` (merged with the entries already in the file);
``__init__`` reads it back (an unreadable file only warns). Entries of this
model's context that were timed with another ``evict_bytes`` (a file without
``"timing"`` was timed back to back: ``evict0``) are ignored with a warning.

**Fitted model.** A shape not in the cache while ``measure=False`` is
predicted per op family as ``t = t0 + work / rate``. ``work`` is floating
point operations for conv and linear passes (``2*n*f*c*kh*kw*ho*wo``,
``2*n*c*f``) and the minimal bytes touched for memory-bound ops (e.g. relu
forward reads x and writes y: ``2*numel*itemsize``; pools: the input plus
every window read). ``rates`` is ``{family: {"t0": seconds, "rate": per
second}}`` with one entry per pass family (``conv_fwd``, ``conv_bwd_data``,
``conv_bwd_filter``, ``linear``, ``bn_fwd`` ... see :data:`FAMILIES`).
:meth:`ComputeModel.fit` refits them by non-negative least squares on the
relative error over the cached entries of this dtype/backend/threads; it runs
at ``__init__`` on a loaded cache, and families with fewer than 3 distinct
shapes keep their previous rates. Defaults (:data:`DEFAULT_RATES`) describe
one CPU core (50 GFLOP/s, 5 GB/s, 20 us per call; float64 flop rates halved)
or, on CuPy, a V100-class GPU. A ``rates`` argument (from a machine file) is
applied last and may name a family, a group (``"conv"`` sets all three conv
passes) or a kind (``"flops"``, ``"memory"``: every family of that kind not
named otherwise).

**Scale.** Every returned time, measured or predicted, is multiplied by
``scale`` (a per-device speed factor from the machine file).
"""
from __future__ import annotations

import json
import math
import os
import sys
import tempfile
import time
import types
import warnings

import numpy as np

from .. import ops
from ..backend import backend_name

FORMAT = 1

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
# Optimizer settings the update is timed with (a typical ResNet recipe; Adam's defaults).
SGD_SETTINGS = dict(lr=0.1, momentum=0.9, weight_decay=1e-4, nesterov=False, dampening=0.0)
ADAM_SETTINGS = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
MIN_POINTS = 3
# Bytes written between two timed calls on NumPy, so that each call finds its inputs,
# weights and workspaces evicted from this core's caches, as inside a training step, where
# the other layers' data passes through the caches between one layer's forward and its
# backward (and between steps). Timed back to back on the 2-core dev VM (2 MiB L2 per
# core), the stem conv and the 1x1 downsample of a wide ResNet ran up to 2x, and the SGD
# update of 4.7 M parameters 15% (15.9 vs 18.7 ms; 22 ms inside the step), faster than
# with this eviction; large 3x3 convs changed by 0-15%. Tiny kernels (a few us) are
# overestimated with it: their data stays cached in a real step.
EVICT_BYTES = 32 << 20


def _pair(v):
    if isinstance(v, (int, np.integer)):
        return (int(v), int(v))
    a, b = v
    return (int(a), int(b))


def _fmt(v):
    return f"{v[0]}x{v[1]}" if isinstance(v, tuple) else str(int(v))


def _parse_args(s):
    out = {}
    for part in s.split(","):
        k, v = part.split("=")
        out[k] = tuple(int(t) for t in v.split("x")) if "x" in v else int(v)
    return out


def _conv_out(h, w, k, s, p, d):
    return ops.conv2d_output_hw(h, w, k, s, p, d)


def work(family, a, itemsize):
    """Work of one pass: flops (conv/linear) or bytes touched, from the key's args ``a``."""
    b = itemsize
    if family.startswith("conv"):
        ho, wo = _conv_out(a["h"], a["w"], a["k"], a["s"], a["p"], a["d"])
        return 2.0 * a["n"] * a["f"] * a["c"] * a["k"][0] * a["k"][1] * ho * wo
    if family.startswith("linear"):
        return 2.0 * a["n"] * a["c"] * a["f"]
    if family.startswith(("maxpool", "avgpool")):
        ho, wo = _conv_out(a["h"], a["w"], a["k"], a["s"], a["p"], (1, 1))
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


class ComputeModel:
    """Local kernel times of one rank, measured and cached, or predicted by fitted rates.

    ``cache_path``: JSON cache file (loaded if present); ``measure``: time unseen shapes
    (else predict); ``rates``: overrides of the fitted model (see the module doc);
    ``scale``: factor on every returned time; ``dtype``: "float32"/"float64";
    ``backend``: "numpy"/"cupy" (default: the one in use); ``threads``: BLAS threads to
    measure with (default: the current threadpoolctl setting); ``reps``: timed calls.
    ``rounds``: how many times :meth:`refine` times each shape this instance measured
    (1: once, as first measured). ``measured`` and ``hits`` count cache entries (one per
    pass) measured and found.
    """

    def __init__(self, cache_path=None, measure=True, rates=None, scale=1.0,
                 dtype="float32", backend=None, threads=None, reps=3, verbose=False,
                 evict_bytes=None, rounds=1):
        self.cache_path = None if cache_path is None else os.fspath(cache_path)
        self.measure = bool(measure)
        self.scale = float(scale)
        self.dtype = np.dtype(dtype).name
        if self.dtype not in ("float32", "float64", "float16"):
            raise ValueError(f"ComputeModel dtype must be a float type, got {dtype!r}")
        self.itemsize = np.dtype(self.dtype).itemsize
        self.backend = (backend or backend_name()).lower()
        if self.backend not in ("numpy", "cupy"):
            raise ValueError(f"backend must be 'numpy' or 'cupy', got {backend!r}")
        self.threads = None if threads is None else max(1, int(threads))
        tag = 0 if self.backend == "cupy" else (self.threads or _blas_threads())
        self.context = f"{self.dtype}|{self.backend}|t{tag}"
        self.reps = max(1, int(reps))
        self.rounds = max(1, int(rounds))
        self._recipes = {}  # keys measured here -> how to time them again (refine)
        if evict_bytes is None:
            evict_bytes = 0 if self.backend == "cupy" else EVICT_BYTES
        self.evict_bytes = max(0, int(evict_bytes))
        self.timing = f"evict{self.evict_bytes}"
        self._evict_buf = None
        self.verbose = verbose
        self.entries: dict[str, float] = {}
        self.measured = 0
        self.hits = 0
        self._file_rates = {}
        self._file_timing = {}
        self._rng = np.random.default_rng(0)
        if self.cache_path is not None and os.path.exists(self.cache_path):
            self._load(self.cache_path)
        base = DEFAULT_RATES_GPU if self.backend == "cupy" else DEFAULT_RATES
        fl = 4.0 / self.itemsize if self.backend == "numpy" else 1.0
        self.rates = {}
        for fam, (_, kind) in FAMILIES.items():
            r = dict(base[kind])
            if kind == "flops":
                r["rate"] *= min(fl, 1.0)
            self.rates[fam] = r
        self.fit()
        if rates:
            self._apply_rates(rates)

    # ------------------------------------------------------------------ cache
    def _load(self, path):
        try:
            with open(path) as fh:
                d = json.load(fh)
            if not isinstance(d, dict) or d.get("format") != FORMAT:
                raise ValueError(f"not a format-{FORMAT} compute cache")
            entries = {str(k): float(v) for k, v in d.get("entries", {}).items()}
            file_rates = d.get("rates") or {}
            if not isinstance(file_rates, dict):
                raise ValueError("'rates' is not an object")
        except (OSError, ValueError, TypeError, AttributeError) as e:
            warnings.warn(f"compute cache {path!r} is unreadable ({e}); starting empty",
                          stacklevel=3)
            return
        timing = d.get("timing") or {}
        if not isinstance(timing, dict):
            timing = {}
        self._file_timing = timing
        theirs = timing.get(self.context, "evict0")  # files without it: warm-cache times
        if theirs != self.timing:
            suffix = "|" + self.context
            mine = [k for k in entries if k.endswith(suffix)]
            if mine:
                warnings.warn(f"compute cache {path!r}: its {len(mine)} {self.context} entries "
                              f"were timed with {theirs!r}, this model times with "
                              f"{self.timing!r} (cache eviction between calls); they are "
                              "ignored and will be measured again", stacklevel=3)
            entries = {k: v for k, v in entries.items() if not k.endswith(suffix)}
            file_rates = {k: v for k, v in file_rates.items() if k != self.context}
        self.entries.update(entries)
        self._file_rates = file_rates

    def to_dict(self) -> dict:
        """The cache file's content: format, every entry, and the rates of this context."""
        rates = dict(self._file_rates)
        rates[self.context] = {k: dict(v) for k, v in self.rates.items()}
        timing = dict(self._file_timing)
        timing[self.context] = self.timing
        return {"format": FORMAT, "entries": dict(sorted(self.entries.items())),
                "rates": rates, "timing": timing}

    def save(self, path=None) -> None:
        """Write the cache atomically (temp file + os.replace) to ``path`` or ``cache_path``,
        keeping entries of the file written meanwhile by others."""
        path = os.fspath(path) if path is not None else self.cache_path
        if path is None:
            raise ValueError("ComputeModel.save: no path and no cache_path")
        d = self.to_dict()
        if os.path.exists(path):
            try:
                with open(path) as fh:
                    old = json.load(fh)
                if old.get("format") == FORMAT:
                    old_entries = dict(old.get("entries", {}))
                    old_timing = old.get("timing") or {}
                    if not isinstance(old_timing, dict):
                        old_timing = {}
                    if old_timing.get(self.context, "evict0") != self.timing:
                        # written meanwhile with another timing: ours replace its entries
                        suffix = "|" + self.context
                        old_entries = {k: v for k, v in old_entries.items()
                                       if not k.endswith(suffix)}
                    d["entries"] = dict(sorted({**old_entries, **d["entries"]}.items()))
                    d["rates"] = {**old.get("rates", {}), **d["rates"]}
                    d["timing"] = {**old_timing, **d["timing"]}
            except (OSError, ValueError, AttributeError, TypeError):
                pass
        folder = os.path.dirname(os.path.abspath(path))
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".compute-", suffix=".json", dir=folder)
        try:
            with os.fdopen(fd, "w") as fh:
                json.dump(d, fh, indent=1)
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise

    # ------------------------------------------------------------------ model
    def _apply_rates(self, rates):
        if not isinstance(rates, dict):
            raise ValueError(f"rates must be a dict, got {rates!r}")
        unknown = [n for n in rates if n not in FAMILIES and n not in DEFAULT_RATES
                   and n not in {g for g, _ in FAMILIES.values()}]
        if unknown:
            warnings.warn(f"compute rates: unknown families {unknown} ignored", stacklevel=3)
        # kind first, then group, then family: the most specific name wins
        for level in (2, 1, 0):
            for name, r in rates.items():
                targets = [f for f, (g, k) in FAMILIES.items() if (f, g, k)[level] == name]
                if targets:
                    r = _check_rate(name, r)
                    for f in targets:
                        self.rates[f] = dict(r)

    def _points(self):
        """{family: [(work, seconds)]} over cached entries of this context."""
        pts = {}
        suffix = "|" + self.context
        for key, t in self.entries.items():
            if not key.endswith(suffix) or t <= 0:
                continue
            fam, args = key.split("|", 2)[:2]
            if fam in FAMILIES:
                try:
                    pts.setdefault(fam, []).append((work(fam, _parse_args(args),
                                                         self.itemsize), t))
                except (ValueError, KeyError):
                    continue
        return pts

    def fit(self) -> dict:
        """Refit ``rates`` per family from the measured entries of this dtype/backend/threads
        (families with fewer than 3 distinct shapes keep theirs); returns ``rates``."""
        for fam, pts in sorted(self._points().items()):
            pts.sort()  # the fit must not depend on the order entries were added
            if len({w for w, _ in pts}) >= MIN_POINTS:
                r = _fit_line(pts)
                if r is not None:
                    self.rates[fam] = r
        return self.rates

    def predict(self, family, work_):
        """Seconds (unscaled) of ``work_`` units of ``family`` by the fitted model."""
        r = self.rates[family]
        return r["t0"] + work_ / r["rate"]

    # ------------------------------------------------------------------ lookup
    def _key(self, family, args):
        return f"{family}|{','.join(f'{k}={_fmt(v)}' for k, v in args.items())}|{self.context}"

    def _times(self, families, args, measure_fn):
        """Seconds of each family's pass: cache, else measure (all missing at once), else
        predict; each multiplied by ``scale``."""
        keys = [self._key(f, args) for f in families]
        missing = [f for f, k in zip(families, keys) if k not in self.entries]
        self.hits += len(families) - len(missing)
        if missing and self.measure:
            got = self._measured(missing, measure_fn)
            self._recipes[tuple(self._key(f, args) for f in missing)] = (
                tuple(missing), measure_fn, [[got[f]] for f in missing])
            for f in missing:
                k = self._key(f, args)
                self.entries[k] = got[f]
                self.measured += 1
                if self.verbose:
                    print(f"compute: {k} = {got[f] * 1e3:.4f} ms", file=sys.stderr)
        out = []
        for f, k in zip(families, keys):
            t = self.entries.get(k)
            if t is None:
                t = self.predict(f, work(f, args, self.itemsize))
            out.append(t * self.scale)
        return tuple(out)

    def refine(self) -> int:
        """Time every kernel pass this instance measured ``rounds - 1`` more times, in
        sweeps over all of them (one sweep per round), and set each entry to the median
        of its rounds -> the number of entries refined (0 when ``rounds`` is 1 or nothing
        new was measured; entries from the cache are left as they are).

        Why: the ``reps`` calls of one shape take milliseconds, while a shared VM's cores
        switch between speed states every few seconds (on the dev VM the same conv took
        3.4 or 4.6-4.9 ms), so shapes measured at different moments can be 30% apart for
        no reason of their own, and the search then picks between near-equal plans by
        that. A sweep spreads each shape's samples over the states. Call it after the
        search has touched every shape (:func:`.auto.plan_model` does, with a fresh
        :class:`.costs.CostModel` afterwards, since a cost model keeps the times it read).
        """
        if self.rounds <= 1 or not self._recipes:
            return 0
        for _ in range(self.rounds - 1):
            for keys, (fams, fn, samples) in self._recipes.items():
                got = self._measured(fams, fn)
                for f, smp in zip(fams, samples):
                    smp.append(got[f])
        n = 0
        for keys, (fams, fn, samples) in self._recipes.items():
            for k, smp in zip(keys, samples):
                self.entries[k] = float(np.median(smp))
                n += 1
                if self.verbose:
                    print(f"compute: {k} = {self.entries[k] * 1e3:.4f} ms (median of "
                          f"{len(smp)} rounds)", file=sys.stderr)
        self._recipes = {}
        return n

    # ------------------------------------------------------------------ measuring
    def _xp(self):
        if self.backend == "cupy":
            import cupy
            return cupy
        return np

    def _rand(self, *shape):
        a = self._rng.standard_normal(shape).astype(self.dtype)
        return self._xp().asarray(a)

    def _measured(self, families, measure_fn):
        """Run ``measure_fn(timer)`` under the thread limit; it returns {family: seconds}."""
        xp = self._xp()
        sync = (xp.cuda.Device().synchronize if self.backend == "cupy" else (lambda: None))
        reps = self.reps

        evict = self._evict
        single = self._single_thread()

        def timer(fn):
            sync()
            fn()
            sync()
            return _median_time(fn, reps, before=evict, after=sync, single=single)

        if self.threads is not None and self.backend == "numpy":
            from threadpoolctl import threadpool_limits
            with threadpool_limits(limits=self.threads):
                return measure_fn(timer, families)
        return measure_fn(timer, families)

    def _single_thread(self):
        """True when one NumPy thread runs the kernels, so that a call's process CPU time
        equals its wall time unless the OS took the core away."""
        return self.backend == "numpy" and (self.threads or _blas_threads()) == 1

    def _evict(self):
        """Push this core's caches out before a timed call (see ``EVICT_BYTES``)."""
        if not self.evict_bytes or self.backend == "cupy":
            return
        if self._evict_buf is None:
            self._evict_buf = np.zeros(self.evict_bytes // 8, np.float64)
        self._evict_buf += 1.0

    # ------------------------------------------------------------------ ops
    def conv(self, n, c, h, w, f, kernel, stride, padding, dilation):
        """(forward, backward_data, backward_filter) seconds of ``ops.conv2d_*`` on
        x (n, c, h, w), w (f, c, kh, kw), dy (n, f, ho, wo)."""
        k, s, p, d = _pair(kernel), _pair(stride), _pair(padding), _pair(dilation)
        if min(n, c, h, w, f) <= 0:
            return (0.0, 0.0, 0.0)
        ho, wo = ops.conv2d_output_hw(h, w, k, s, p, d)
        args = dict(n=n, c=c, h=h, w=w, f=f, k=k, s=s, p=p, d=d)

        def run(timer, fams):
            x, wt, dy = self._rand(n, c, h, w), self._rand(f, c, *k), self._rand(n, f, ho, wo)
            fns = {"conv_fwd": lambda: ops.conv2d_forward(x, wt, s, p, d),
                   "conv_bwd_data": lambda: ops.conv2d_backward_data(dy, wt, (h, w), s, p, d),
                   "conv_bwd_filter": lambda: ops.conv2d_backward_filter(x, dy, k, s, p, d)}
            return {fam: timer(fns[fam]) for fam in fams}
        return self._times(("conv_fwd", "conv_bwd_data", "conv_bwd_filter"), args, run)

    def linear(self, n, c, f):
        """(forward, backward_data, backward_filter) seconds of x (n, c) @ w.T with
        w (f, c); dy @ w; dy.T @ x with dy (n, f)."""
        if min(n, c, f) <= 0:
            return (0.0, 0.0, 0.0)

        def run(timer, fams):
            x, wt, dy = self._rand(n, c), self._rand(f, c), self._rand(n, f)
            fns = {"linear_fwd": lambda: x @ wt.T, "linear_bwd_data": lambda: dy @ wt,
                   "linear_bwd_filter": lambda: dy.T @ x}
            return {fam: timer(fns[fam]) for fam in fams}
        return self._times(("linear_fwd", "linear_bwd_data", "linear_bwd_filter"),
                           dict(n=n, c=c, f=f), run)

    def bn(self, n, c, h, w):
        """(forward, backward) seconds of training batch norm on x (n, c, h, w): stats +
        mean/invstd + apply; backward reduce + apply + parameter gradients."""
        if min(n, c, h, w) <= 0:
            return (0.0, 0.0)

        def run(timer, fams):
            x, dy = self._rand(n, c, h, w), self._rand(n, c, h, w)
            g, b = self._rand(c), self._rand(c)
            cnt = n * h * w
            mean, inv, _ = ops.bn_mean_invstd(*ops.bn_local_stats(x))

            def fwd():
                m, i, _ = ops.bn_mean_invstd(*ops.bn_local_stats(x))
                return ops.bn_forward_apply(x, m, i, g, b)

            def bwd():
                sdy, sdyx = ops.bn_backward_reduce(dy, x, mean)
                dx = ops.bn_backward_apply(dy, x, mean, inv, g, sdy, sdyx, cnt)
                return dx, ops.bn_param_grads(sdy, sdyx, inv)
            fns = {"bn_fwd": fwd, "bn_bwd": bwd}
            return {fam: timer(fns[fam]) for fam in fams}
        return self._times(("bn_fwd", "bn_bwd"), dict(n=n, c=c, h=h, w=w), run)

    def relu(self, numel):
        """(forward, backward) seconds of ReLU on an array of ``numel`` elements."""
        if numel <= 0:
            return (0.0, 0.0)

        def run(timer, fams):
            x, dy = self._rand(numel), self._rand(numel)
            y = ops.relu_forward(x)
            fns = {"relu_fwd": lambda: ops.relu_forward(x),
                   "relu_bwd": lambda: ops.relu_backward(dy, y)}
            return {fam: timer(fns[fam]) for fam in fams}
        return self._times(("relu_fwd", "relu_bwd"), dict(numel=numel), run)

    def _pool(self, kind, n, c, h, w, kernel, stride, padding):
        k = _pair(kernel)
        s = k if stride is None else _pair(stride)
        p = _pair(padding)
        if min(n, c, h, w) <= 0:
            return (0.0, 0.0)
        fams = (kind + "_fwd", kind + "_bwd")

        def run(timer, want):
            x = self._rand(n, c, h, w)
            if kind == "maxpool":
                y, arg = ops.max_pool2d_forward(x, k, s, p)
                dy = self._rand(*y.shape)
                fns = {fams[0]: lambda: ops.max_pool2d_forward(x, k, s, p),
                       fams[1]: lambda: ops.max_pool2d_backward(dy, arg, x.shape, k, s, p)}
            else:
                dy = self._rand(*ops.avg_pool2d_forward(x, k, s, p).shape)
                fns = {fams[0]: lambda: ops.avg_pool2d_forward(x, k, s, p),
                       fams[1]: lambda: ops.avg_pool2d_backward(dy, x.shape, k, s, p)}
            return {fam: timer(fns[fam]) for fam in want}
        return self._times(fams, dict(n=n, c=c, h=h, w=w, k=k, s=s, p=p), run)

    def maxpool(self, n, c, h, w, kernel, stride, padding):
        """(forward, backward) seconds of max pooling x (n, c, h, w) (stride None = kernel)."""
        return self._pool("maxpool", n, c, h, w, kernel, stride, padding)

    def avgpool(self, n, c, h, w, kernel, stride, padding):
        """(forward, backward) seconds of average pooling x (n, c, h, w)."""
        return self._pool("avgpool", n, c, h, w, kernel, stride, padding)

    def global_avgpool(self, n, c, h, w):
        """(forward, backward) seconds of global average pooling x (n, c, h, w) -> (n, c, 1, 1)."""
        if min(n, c, h, w) <= 0:
            return (0.0, 0.0)

        def run(timer, fams):
            x, dy = self._rand(n, c, h, w), self._rand(n, c, 1, 1)
            fns = {"gap_fwd": lambda: ops.global_avg_pool_forward(x),
                   "gap_bwd": lambda: ops.global_avg_pool_backward(dy, x.shape)}
            return {fam: timer(fns[fam]) for fam in fams}
        return self._times(("gap_fwd", "gap_bwd"), dict(n=n, c=c, h=h, w=w), run)

    def adaptive_avgpool(self, n, c, h, w, ho, wo):
        """(forward, backward) seconds of adaptive average pooling x (n, c, h, w) ->
        (n, c, ho, wo) with PyTorch's bins (:func:`distconv.ops.pool.
        adaptive_avg_pool2d_forward`, two small GEMMs; the (1, 1) case is
        :meth:`global_avgpool`)."""
        if min(n, c, h, w, ho, wo) <= 0:
            return (0.0, 0.0)
        from ..ops import pool as _pool

        def run(timer, fams):
            x, dy = self._rand(n, c, h, w), self._rand(n, c, ho, wo)
            fns = {"adaptive_fwd": lambda: _pool.adaptive_avg_pool2d_forward(x, (ho, wo)),
                   "adaptive_bwd": lambda: _pool.adaptive_avg_pool2d_backward(
                       dy, (n, c, h, w))}
            return {fam: timer(fns[fam]) for fam in fams}
        return self._times(("adaptive_fwd", "adaptive_bwd"),
                           dict(n=n, c=c, h=h, w=w, ho=ho, wo=wo), run)

    def add(self, numel):
        """Seconds of ``a + b`` into a new array, a and b of ``numel`` elements."""
        if numel <= 0:
            return 0.0

        def run(timer, fams):
            a, b = self._rand(numel), self._rand(numel)
            return {"add": timer(lambda: a + b)}
        return self._times(("add",), dict(numel=numel), run)[0]

    def layer_overhead(self, kind, bias=False):
        """``(forward, backward)`` seconds a distconv layer of ``kind`` (one of
        :data:`OVERHEAD_KINDS`; ``"join"`` is a residual join, ``"gap"`` an
        ``AdaptiveAvgPool2d`` to 1x1 and ``"adaptive"`` one to a larger output) spends
        besides its kernels:
        the Python of the layer, its checks, distributions and DistTensors, the no-op
        redistributions and the small per-channel arithmetic around the kernels.
        ``"redistribute"``: the Python of ``DistTensor.redistribute`` around ONE
        collective (both values alike), timed on a move between two one-rank grids (the
        between-grid path, whose alltoallv has no MPI on one rank); the cost model adds
        it to every collective a redistribution issues, which the alpha-beta machine
        (calibrated on bare ``Communicator`` calls) does not include. On ``p`` ranks the
        between-grid path loops over the ranks, so this one-rank value is a lower bound.

        Measured as the time of the real layer (``bias`` for conv and linear) on a
        one-element input, on a grid of this process alone (no collective: safe on any
        rank of a running job, alone), minus the kernels' own times on that input; the
        median of ``max(reps, 25)`` back-to-back calls (no cache eviction: the layers'
        Python stays cached through a step), clamped at 0.
        Cached as ``overhead_fwd|kind=<kind>,bias=<0|1>|<context>`` (and ``overhead_bwd``).
        Not cached while ``measure=False``: 0.0 (the fitted model has only the kernels'
        per-call ``t0``). Multiplied by ``scale`` like every time.
        """
        if kind not in OVERHEAD_KINDS:
            raise ValueError(f"layer_overhead: unknown kind {kind!r}; expected one of "
                             f"{OVERHEAD_KINDS}")
        b = int(bool(bias)) if kind in ("conv", "linear") else 0
        keys = [f"overhead_{ph}|kind={kind},bias={b}|{self.context}" for ph in ("fwd", "bwd")]
        if all(k in self.entries for k in keys):
            self.hits += 2
        elif self.measure:
            got = self._measure_overhead(kind, bool(b))
            for k, t in zip(keys, got):
                self.entries[k] = t
                self.measured += 1
                if self.verbose:
                    print(f"compute: {k} = {t * 1e3:.4f} ms", file=sys.stderr)
        return tuple(self.entries.get(k, 0.0) * self.scale for k in keys)

    def _measure_overhead(self, kind, bias):
        if self.backend == "cupy":  # the GPU path would need stream syncs: not modelled
            return [0.0, 0.0]
        reps = max(self.reps, 25)
        # The kernels on the one-element input, timed the same way as the layer: back to
        # back, without cache eviction (what is measured here is the Python that every
        # layer call runs, whose code and objects stay cached through a training step;
        # evicting them would time a cold interpreter), by a private uncached model.
        hot = ComputeModel(measure=True, dtype=self.dtype, backend=self.backend,
                           threads=self.threads, reps=reps, evict_bytes=0)

        def run(timer, fams):
            fwd, setup, bwd, kf, kb = _overhead_case(hot, kind, bias)
            out = []
            single = self._single_thread()
            for fn, pre, k in ((fwd, None, kf), (bwd, setup, kb)):
                pre = pre if pre is not None else (lambda: None)
                pre()
                fn()  # warm-up
                t = _median_time(fn, reps, before=pre, single=single)
                out.append(max(0.0, t - k))
            return out
        return self._measured((), run)

    def update(self, numel, optimizer="sgd"):
        """Seconds of one optimizer step over ``numel`` parameters: ``"sgd"`` is
        distconv.optim.SGD's update (momentum 0.9, weight decay 1e-4), ``"adam"`` Adam's."""
        opt = str(optimizer).lower()
        if opt not in ("sgd", "adam"):
            raise ValueError(f"optimizer must be 'sgd' or 'adam', got {optimizer!r}")
        if numel <= 0:
            return 0.0
        fam = "update_" + opt

        def run(timer, fams):
            from .. import optim
            cls, settings = ((optim.SGD, SGD_SETTINGS) if opt == "sgd"
                             else (optim.Adam, ADAM_SETTINGS))
            fake = types.SimpleNamespace(**settings)  # the attributes _update reads
            w, g, state = self._rand(numel), self._rand(numel) * 1e-3, {}
            cls._update(fake, 0, w, g, state)  # creates the state: time the steady step
            return {fam: timer(lambda: cls._update(fake, 0, w, g, state))}
        return self._times((fam,), dict(numel=numel), run)[0]


def _median_time(fn, reps, before=None, after=None, single=False):
    """Median wall seconds of ``reps`` calls of ``fn`` (``before()`` untimed ahead of each,
    ``after()`` timed at the end, e.g. a device sync).

    ``single`` (one thread computes): a call counts only if the OS left the core to it,
    i.e. its wall time exceeds its process CPU time by at most 5% (or 20 us); up to
    ``3 * reps`` more calls are made until ``reps`` such clean ones are in. On a machine
    shared with other processes this keeps a burst of their load out of the cached time;
    if too few calls are clean the median of all is used.
    """
    clean, every = [], []
    limit = reps * 4 if single else reps
    while len(every) < limit and len(clean) < reps:
        if before is not None:
            before()
        c0 = time.process_time()
        t0 = time.perf_counter()
        fn()
        if after is not None:
            after()
        t = time.perf_counter() - t0
        c = time.process_time() - c0
        every.append(t)
        if not single or t - c <= max(0.05 * t, 20e-6):
            clean.append(t)
    return float(np.median(clean if len(clean) >= (reps + 1) // 2 else every))


# ------------------------------------------------------------------ layer overheads
OVERHEAD_KINDS = ("conv", "linear", "bn", "relu", "maxpool", "avgpool", "gap", "adaptive",
                  "flatten", "join", "redistribute")
_SELF_GRID = []


def _self_grid(fresh=False):
    """A (1, 1, 1) ProcessGrid of this process alone (``MPI.COMM_SELF``, private
    statistics); ``fresh``: another one, not the same grid to ``same_grid``."""
    from .. import comm as _comm
    from ..grid import ProcessGrid
    from ..strategy import AXES

    def make():
        return ProcessGrid(_comm.self_comm(), (1, 1, 1), AXES)
    if fresh:
        return make()
    if not _SELF_GRID:
        _SELF_GRID.append(make())
    return _SELF_GRID[0]


def _self_strategy():
    """A Strategy whose grid is this process alone (``MPI.COMM_SELF``, private statistics):
    a layer built with it runs the same Python as under any strategy, with no collective,
    so it can be timed on one rank of a running job without the others."""
    from ..strategy import Strategy

    class _SelfStrategy(Strategy):
        def grid(self, comm=None):
            return _self_grid()
    return _SelfStrategy(sample=1, channel=1, filter=1)


def _overhead_case(cm, kind, bias):
    """``(forward, backward_setup, backward, kernel forward s, kernel backward s)`` of a
    real distconv layer of ``kind`` on a one-element input of this model's dtype, one rank
    (callables; ``backward_setup`` runs the untimed forward each backward needs)."""
    from .. import nn
    from ..functional import add as _add
    from ..nn import module as _mod
    from ..tensor import DistTensor
    st = _self_strategy()
    dt = np.dtype(cm.dtype)
    seed = (_mod._SEED[0], _mod._COUNTER[0])  # building layers must not move the model seed
    try:
        if kind == "conv":
            layer = nn.Conv2d(1, 1, 1, bias=bias, strategy=st)
            shape, kern = (1, 1, 1, 1), cm.conv(1, 1, 1, 1, 1, 1, 1, 0, 1)
            kern = (kern[0], kern[1] + kern[2])
        elif kind == "linear":
            layer = nn.Linear(1, 1, bias=bias, strategy=st)
            shape, kern = (1, 1), cm.linear(1, 1, 1)
            kern = (kern[0], kern[1] + kern[2])
        elif kind == "bn":
            layer, shape = nn.BatchNorm2d(1, strategy=st), (2, 1, 1, 1)
            kern = cm.bn(2, 1, 1, 1)
        elif kind == "relu":
            layer, shape, kern = nn.ReLU(), (1, 1, 1, 1), cm.relu(1)
        elif kind in ("maxpool", "avgpool"):
            layer = (nn.MaxPool2d if kind == "maxpool" else nn.AvgPool2d)(2, 2)
            shape = (1, 1, 2, 2)
            kern = getattr(cm, kind)(1, 1, 2, 2, 2, 2, 0)
        elif kind == "gap":
            layer, shape = nn.AdaptiveAvgPool2d(1), (1, 1, 1, 1)
            kern = cm.global_avgpool(1, 1, 1, 1)
        elif kind == "adaptive":  # AdaptiveAvgPool2d to more than 1x1 (its GEMM path)
            layer, shape = nn.AdaptiveAvgPool2d(2), (1, 1, 2, 2)
            kern = cm.adaptive_avgpool(1, 1, 2, 2, 2, 2)
        elif kind == "flatten":
            layer, shape, kern = nn.Flatten(), (1, 1, 1, 1), (0.0, 0.0)
        elif kind == "join":
            layer, shape = None, (1, 1, 1, 1)
            kern = (cm.add(1), cm.add(1))
        elif kind == "redistribute":
            layer, shape, kern = None, (1, 1, 1, 1), (0.0, 0.0)
        else:
            raise ValueError(f"layer_overhead: unknown kind {kind!r}; expected one of "
                             f"{OVERHEAD_KINDS}")
    finally:
        _mod._SEED[0], _mod._COUNTER[0] = seed
    act = st.activation_distribution(len(shape))
    x = DistTensor(np.ones(shape, dt), act, shape)
    if kind == "redistribute":
        # a move to another grid over the same (one) rank: DistTensor.redistribute, the
        # between-grid path and a one-rank alltoallv (no MPI): the Python around one
        # collective of a redistribution
        other = act.__class__(_self_grid(fresh=True), list(act.split))
        return ((lambda: x.redistribute(other)), (lambda: None),
                (lambda: x.redistribute(other)), 0.0, 0.0)
    if layer is None:  # residual join: the add forward, the gradient split backward
        return ((lambda: _add(x, x)), (lambda: None),
                (lambda: _add(x.redistribute(act), x.redistribute(act))), *kern)
    y = layer(x)
    dy = DistTensor(np.ones(y.local.shape, dt), y.distribution, y.shape)
    return (lambda: layer(x)), (lambda: layer(x)), (lambda: layer.backward(dy)), *kern


def _blas_threads():
    """The BLAS thread count in effect now (threadpoolctl), 1 if unknown."""
    try:
        from threadpoolctl import threadpool_info
        n = [d.get("num_threads", 1) for d in threadpool_info() if d.get("user_api") == "blas"]
        return max(n) if n else 1
    except Exception:  # threadpoolctl missing or broken
        return 1
