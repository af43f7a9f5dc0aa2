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
``__init__`` reads it back (an unreadable file only warns). The ``"timing"`` of a
context is ``evict<bytes>|code-<fingerprint>`` (:func:`code_fingerprint` of the timed
code); entries of this model's context timed another way (another ``evict_bytes``, other
kernel code, or a file without ``"timing"``: ``evict0``) are ignored with a warning and
measured again.

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
import os
import sys
import warnings

import numpy as np

from ..atomic import write_text
from ..backend import backend_name
from .timing import _blas_threads, _median_time  # noqa: F401
from .optimes import ADAM_SETTINGS, SGD_SETTINGS, OpTimes  # noqa: F401  (re-exported)
from .overhead import OVERHEAD_KINDS, OverheadTimes  # noqa: F401  (re-exported)
from .work import (  # noqa: F401  (re-exported: the model's families and fitted lines)
    DEFAULT_RATES, DEFAULT_RATES_GPU, FAMILIES, MIN_POINTS, _check_rate, _fit_line, _fmt,
    _parse_args, work)

FORMAT = 1
# Bytes written between two timed calls on NumPy, so that each call finds its inputs,
# weights and workspaces evicted from this core's caches, as inside a training step, where
# the other layers' data passes through the caches between one layer's forward and its
# backward (and between steps). Back-to-back calls find their data cached and time small
# and memory-bound kernels up to 2x faster than a step runs them; tiny kernels (a few us)
# are overestimated with eviction (see benchmarks/README.md, "compute model timing").
EVICT_BYTES = 32 << 20


_FINGERPRINT: list = []


def code_fingerprint() -> str:
    """12 hex digits of SHA-1 over the source of the code the compute model times: every
    module of :mod:`distconv` outside :mod:`distconv.planner` and :mod:`distconv.bench`
    (the kernels, the layers whose Python is the measured overhead, the optimizers). A
    cache's entries are kept only under the fingerprint they were timed with, so a change
    of the kernels re-measures them instead of planning with the old code's times."""
    if not _FINGERPRINT:
        import hashlib
        from pathlib import Path
        root = Path(__file__).resolve().parent.parent
        h = hashlib.sha1()
        for f in sorted(root.rglob("*.py")):
            rel = f.relative_to(root).as_posix()
            if rel.startswith(("planner/", "bench/")):
                continue
            h.update(rel.encode() + b"\0" + f.read_bytes() + b"\0")
        _FINGERPRINT.append(h.hexdigest()[:12])
    return _FINGERPRINT[0]


class ComputeModel(OpTimes, OverheadTimes):
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
        self.timing = f"evict{self.evict_bytes}|code-{code_fingerprint()}"
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
                              f"{self.timing!r} (cache eviction between calls, and a "
                              "fingerprint of the timed code: distconv's kernels, layers "
                              "and optimizers); they are ignored and will be measured "
                              "again", stacklevel=3)
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
        write_text(path, json.dumps(d, indent=1))

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
