"""Seconds of the LOCAL kernels one rank runs for its shard of a layer.

The compute half of the planner's cost model. Every method of
:class:`ComputeModel` takes local shard sizes (ints, after the strategy split)
and returns seconds; a shard with any zero extent costs 0.0.

**Measured times and the cache.** With ``measure=True`` a shape never seen
before is timed with the real kernels of :mod:`distconv.ops` on the backend
(NumPy, or CuPy with the device synchronised around every timed call) on
random inputs of ``dtype``: one untimed warm-up call, then the median of
``reps`` timed calls (``time.perf_counter``). Each pass is one cache entry
under a human-readable string key::

    op|arg=value,...|dtype|backend|t<threads>
    conv_fwd|n=4,c=64,h=28,w=28,f=64,k=3x3,s=1x1,p=1x1,d=1x1|float32|numpy|t1

``threads`` is the BLAS thread count the time was taken with (``t0`` on
CuPy, where it does not apply). ``save()`` writes the cache atomically to
``cache_path`` as JSON ``{"format": 1, "entries": {key: seconds}, "rates":
{"dtype|backend|t<threads>": rates}}`` (merged with the entries already in
the file); ``__init__`` reads it back (an unreadable file only warns).

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
    ``measured`` and ``hits`` count cache entries (one per pass) measured and found.
    """

    def __init__(self, cache_path=None, measure=True, rates=None, scale=1.0,
                 dtype="float32", backend=None, threads=None, reps=3, verbose=False):
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
        self.verbose = verbose
        self.entries: dict[str, float] = {}
        self.measured = 0
        self.hits = 0
        self._file_rates = {}
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
        self.entries.update(entries)
        self._file_rates = file_rates

    def to_dict(self) -> dict:
        """The cache file's content: format, every entry, and the rates of this context."""
        rates = dict(self._file_rates)
        rates[self.context] = {k: dict(v) for k, v in self.rates.items()}
        return {"format": FORMAT, "entries": dict(sorted(self.entries.items())),
                "rates": rates}

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
                    d["entries"] = dict(sorted({**old.get("entries", {}),
                                                **d["entries"]}.items()))
                    d["rates"] = {**old.get("rates", {}), **d["rates"]}
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

        def timer(fn):
            sync()
            fn()
            sync()
            ts = []
            for _ in range(reps):
                t0 = time.perf_counter()
                fn()
                sync()
                ts.append(time.perf_counter() - t0)
            return float(np.median(ts))

        if self.threads is not None and self.backend == "numpy":
            from threadpoolctl import threadpool_limits
            with threadpool_limits(limits=self.threads):
                return measure_fn(timer, families)
        return measure_fn(timer, families)

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

    def add(self, numel):
        """Seconds of ``a + b`` into a new array, a and b of ``numel`` elements."""
        if numel <= 0:
            return 0.0

        def run(timer, fams):
            a, b = self._rand(numel), self._rand(numel)
            return {"add": timer(lambda: a + b)}
        return self._times(("add",), dict(numel=numel), run)[0]

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


def _blas_threads():
    """The BLAS thread count in effect now (threadpoolctl), 1 if unknown."""
    try:
        from threadpoolctl import threadpool_info
        n = [d.get("num_threads", 1) for d in threadpool_info() if d.get("user_api") == "blas"]
        return max(n) if n else 1
    except Exception:  # threadpoolctl missing or broken
        return 1
