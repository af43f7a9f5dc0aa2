"""Run pytest cases under a real ``mpiexec -n N``, many cases per launch.

Import path: ``from tests.mpi_harness import mpi`` (``tests`` is a package;
pytest puts the repository root on ``sys.path``, and the MPI children get it
on ``PYTHONPATH``). The pytest plugin hooks below are registered by
``tests/conftest.py``; elsewhere use ``pytest -p tests.mpi_harness``.

Writing an MPI case::

    import pytest
    from tests.mpi_harness import mpi

    @pytest.mark.parametrize("n", [1, 7])          # optional, stacks as usual
    @mpi(ranks=(1, 2, 3, 4), timeout=60)
    def test_allreduce(comm, n):                   # comm: a Dup of MPI.COMM_WORLD
        ...                                        # same body on every rank

* The first parameter receives the communicator (a fresh ``COMM_WORLD.Dup()``
  per case, freed afterwards). Every other parameter must come from
  ``@pytest.mark.parametrize`` (function- or module-level, not ``indirect``);
  fixtures are not available inside MPI cases (``mpi_tmp_path(comm)`` gives a
  shared temporary folder). Cases must be module-level functions.
* One pytest item per rank count and parameter set: ``test_allreduce[np=2-1]``.
  ``-k np2`` selects the 2-rank items (``=`` is not allowed in ``-k``);
  node ids such as ``"tests/test_x.py::test_allreduce[np=2-1]"`` work too.
* An exception (or ``pytest.fail``) on ANY rank fails the case; the report
  shows each failing rank's traceback (asserts are rewritten as in pytest) and
  each rank's output as "Captured stdout+stderr (rank r)" sections. ``pytest.skip``
  skips it (call it on every rank alike).
* ``timeout`` (seconds) covers the case on every rank. A case that exceeds it
  is reported as "timed out after Xs (hang?)" with every rank's Python stack;
  the job is aborted and the module's remaining cases are launched again.
  A rank that fails while the others stay inside the case (e.g. waiting for it
  in a collective) aborts the job after a grace of at most 3 s, so a failure
  before a collective is reported in seconds, not after the timeout.
* Rank counts above ``DISTCONV_TEST_MAX_RANKS`` (default 4) are skipped.

How it runs: when the first MPI item of a (test module, rank count) pair
runs, ONE ``mpiexec -n N python -m mpi4py -m tests.mpi_harness SPEC.json``
launch runs every selected case of that pair in order (honouring ``-k``, node
ids, skip marks); the later items just report their stored results, so the
first item's duration includes the whole launch. A launch costs about 1-2 s
(Python, mpi4py, pytest, numpy) plus whatever the test module imports at its
top, on every rank: ``import torch`` alone adds ~2 CPU-seconds per rank, which
is why MPI-heavy modules should import torch lazily or not at all. Do not use
hypothesis ``@given`` in MPI cases (ranks would draw different examples).
Cases in one launch share the process:
restore any global state a case changes (the harness restores distconv's
default dtype after each case). Children get ``OMP_NUM_THREADS=1`` (and the
BLAS equivalents), ``PYTHONUNBUFFERED=1`` and the repository root on
``PYTHONPATH``. Each rank's stdout+stderr goes to ``rank<r>.log`` in a launch
folder under ``DISTCONV_TEST_OUTDIR`` (default: a temporary folder, deleted
at the end of the session when every MPI case passed, kept and printed
otherwise).

mpiexec is the one next to the running Python (the ``mpich`` wheel's in a
venv), else the first on ``PATH``; ``DISTCONV_MPIEXEC`` overrides it (e.g.
``"mpirun --oversubscribe"``).

``run_mpi_script(path_or_code, nranks, timeout, args=())`` runs a whole script
(a ``.py`` path or Python source) under ``mpiexec -n N python -m mpi4py`` and
returns a ``subprocess.CompletedProcess`` (text stdout/stderr of all ranks,
merged); past ``timeout`` it kills the job and raises :class:`MpiTimeoutError`.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import pytest

__all__ = ["mpi", "run_mpi_script", "MpiTimeoutError", "mpi_tmp_path", "max_ranks",
           "mpiexec_command", "child_env"]

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_TIMEOUT = 60.0
FAIL_GRACE = 3.0          # s a failed rank waits for the others before aborting the job
STARTUP_ALLOWANCE = 120.0  # s added to a launch's overall limit for mpiexec + imports
_ATTR = "_distconv_mpi"
_MARK = "\n@@distconv-mpi-case {}@@\n"


# --------------------------------------------------------------------------- user API

def mpi(ranks=(1, 2, 3, 4), timeout: float = DEFAULT_TIMEOUT):
    """Mark ``fn(comm, ...)`` as an MPI case run at each of ``ranks`` (see module doc)."""
    if callable(ranks):  # bare @mpi
        return mpi()(ranks)
    if isinstance(ranks, int):
        ranks = (ranks,)
    ranks = tuple(dict.fromkeys(int(r) for r in ranks))
    if not ranks or min(ranks) < 1:
        raise ValueError(f"@mpi ranks must be positive integers, got {ranks!r}")
    timeout = float(timeout)
    if not timeout > 0:
        raise ValueError(f"@mpi timeout must be > 0, got {timeout!r}")

    def deco(fn):
        params = list(inspect.signature(fn).parameters)
        if not params:
            raise TypeError(f"MPI case {fn.__name__} must take the communicator as first argument")
        setattr(fn, _ATTR, {"ranks": ranks, "timeout": timeout})
        return pytest.mark.mpi(ranks=ranks, timeout=timeout)(fn)

    return deco


def max_ranks() -> int:
    """``DISTCONV_TEST_MAX_RANKS`` (default 4): higher rank counts are skipped."""
    return int(os.environ.get("DISTCONV_TEST_MAX_RANKS", "4"))


@contextlib.contextmanager
def mpi_tmp_path(comm):
    """A temporary folder shared by all ranks of ``comm`` (made by rank 0, removed after)."""
    path = tempfile.mkdtemp(prefix="distconv-case-") if comm.rank == 0 else None
    path = comm.bcast(path, root=0)
    try:
        yield Path(path)
    finally:
        comm.Barrier()
        if comm.rank == 0:
            shutil.rmtree(path, ignore_errors=True)


class MpiTimeoutError(AssertionError):
    """An MPI job ran past its time limit and was killed."""


# --------------------------------------------------------------------------- launching

@functools.lru_cache(maxsize=None)
def _is_open_mpi(exe: str) -> bool:
    try:
        out = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return "open mpi" in (out.stdout + out.stderr).lower()


def mpiexec_command(nranks: int) -> list:
    """The argv prefix that starts ``nranks`` ranks on this host (oversubscribed if need be)."""
    custom = os.environ.get("DISTCONV_MPIEXEC")
    if custom:
        return shlex.split(custom) + ["-n", str(nranks)]
    beside = Path(sys.executable).parent / "mpiexec"
    exe = str(beside) if beside.exists() else shutil.which("mpiexec")
    if not exe:
        raise RuntimeError("mpiexec not found: install an MPI, e.g. pip install -e '.[mpich]'")
    cmd = [exe]
    if _is_open_mpi(exe):
        cmd.append("--oversubscribe")
    return cmd + ["-n", str(nranks)]


def child_env(extra=None, unbuffered: bool = True) -> dict:
    """Environment for MPI children: one BLAS/OpenMP thread per rank, repo on PYTHONPATH.

    ``unbuffered``: set ``PYTHONUNBUFFERED=1`` (else remove it, so that each rank's
    stdout is block-buffered and a ``print(..., flush=True)`` line is one write).
    """
    env = dict(os.environ)
    for v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
              "BLIS_NUM_THREADS", "VECLIB_MAXIMUM_THREADS", "NUMEXPR_NUM_THREADS"):
        env[v] = "1"
    if unbuffered:
        env["PYTHONUNBUFFERED"] = "1"
    else:
        env.pop("PYTHONUNBUFFERED", None)
    env.pop("PYTEST_CURRENT_TEST", None)
    old = env.get("PYTHONPATH")
    env["PYTHONPATH"] = str(REPO_ROOT) + (os.pathsep + old if old else "")
    # Harmless for MPICH; lets Open MPI run as root in containers.
    env.setdefault("OMPI_ALLOW_RUN_AS_ROOT", "1")
    env.setdefault("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
    if extra:
        env.update({k: str(v) for k, v in extra.items()})
    return env


def _kill_job(proc: subprocess.Popen, pids=()) -> None:
    """Stop mpiexec (it cleans up its ranks), then SIGKILL whatever is left."""
    for sig, wait in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 5.0)):
        if proc.poll() is not None:
            break
        with contextlib.suppress(OSError):
            os.killpg(proc.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(wait)
    for pid in pids:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)


def _run_job(cmd, timeout, env=None, cwd=None, pids_of=None):
    """Run ``cmd`` in its own session; returns (rc, stdout, stderr, timed_out)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, text=True, errors="replace",
                            env=env, cwd=cwd, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
        return proc.returncode, out, err, False
    except subprocess.TimeoutExpired:
        _kill_job(proc, pids_of() if pids_of else ())
        out, err = proc.communicate()
        return proc.returncode, out, err, True
    except BaseException:  # e.g. Ctrl-C: the job is in its own session, stop it too
        _kill_job(proc, pids_of() if pids_of else ())
        raise


def run_mpi_script(path_or_code, nranks: int, timeout: float, args=(), env=None, cwd=None):
    """Run a script (``.py`` path) or Python source under ``mpiexec -n nranks``.

    Returns a ``subprocess.CompletedProcess`` with text ``stdout``/``stderr``
    (all ranks merged by mpiexec). Raises :class:`MpiTimeoutError` (an
    ``AssertionError``) with the output if the job is still running after
    ``timeout`` seconds (it is killed first). ``env`` adds variables to
    :func:`child_env`. Each rank's stdout is block-buffered (``PYTHONUNBUFFERED``
    is removed unless ``env`` sets it): lines printed with ``flush=True`` arrive
    whole, but lines of different ranks come in any order, so gather results to
    rank 0 and print them there when a test parses them.
    """
    s = os.fspath(path_or_code)
    is_path = isinstance(path_or_code, os.PathLike) or ("\n" not in s and s.endswith(".py"))
    if is_path:
        p = Path(s) if cwd is None or Path(s).is_absolute() else Path(cwd) / s
        if not p.is_file():
            raise FileNotFoundError(f"run_mpi_script: no such script {p}")
        target = [s]
    else:
        target = ["-c", s]
    cmd = mpiexec_command(nranks) + [sys.executable, "-m", "mpi4py", *target,
                                     *(str(a) for a in args)]
    t0 = time.monotonic()
    rc, out, err, timed_out = _run_job(cmd, timeout, env=child_env(env, unbuffered=False),
                                       cwd=cwd)
    if timed_out:
        raise MpiTimeoutError(
            f"MPI job did not finish within {timeout}s (hang?); killed after "
            f"{time.monotonic() - t0:.1f}s.\ncommand: {shlex.join(cmd)}\n"
            f"--- stdout ---\n{_tail(out)}\n--- stderr ---\n{_tail(err)}")
    return subprocess.CompletedProcess(cmd, rc, out, err)


def _tail(text: str, limit: int = 8000) -> str:
    text = text or ""
    return text if len(text) <= limit else "[... cut ...]\n" + text[-limit:]


# --------------------------------------------------------------------------- parent side

@dataclass
class CaseResult:
    status: str                      # passed | failed | skipped
    message: str = ""
    outputs: dict = field(default_factory=dict)   # rank -> captured output of this case


def _mpi_spec(item):
    fn = getattr(item, "function", None)
    spec = getattr(fn, _ATTR, None)
    if spec is None or not hasattr(item, "callspec"):
        return None
    return spec


def _param_names(markers):
    names = []
    for m in markers:
        if m.kwargs.get("indirect"):
            raise pytest.UsageError("@mpi cases do not support indirect parametrization")
        argnames = m.args[0] if m.args else m.kwargs["argnames"]
        if isinstance(argnames, str):
            argnames = [a.strip() for a in argnames.split(",") if a.strip()]
        names.extend(argnames)
    return names


@pytest.hookimpl(tryfirst=True)
def pytest_generate_tests(metafunc):
    spec = getattr(metafunc.function, _ATTR, None)
    if spec is None:
        return
    if metafunc.cls is not None:
        raise pytest.UsageError(f"@mpi case {metafunc.function.__name__} must be a "
                                "module-level function, not a method")
    params = list(inspect.signature(metafunc.function).parameters)
    commname = params[0]
    given = set(_param_names(metafunc.definition.iter_markers("parametrize")))
    missing = [p for p in params[1:] if p not in given]
    if missing:
        raise pytest.UsageError(
            f"@mpi case {metafunc.function.__name__}: argument(s) {missing} are not "
            "parametrized; MPI cases get only the communicator and "
            "@pytest.mark.parametrize values (no fixtures)")
    limit = max_ranks()
    values = []
    for n in spec["ranks"]:
        marks = ()
        if n > limit:
            marks = (pytest.mark.skip(reason=f"needs {n} MPI ranks; "
                                             f"DISTCONV_TEST_MAX_RANKS={limit}"),)
        values.append(pytest.param(n, marks=marks, id=f"np={n}"))
    metafunc.parametrize(commname, values)


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "mpi(ranks, timeout): a case run under mpiexec at each rank count "
        "(tests/mpi_harness.py)")
    config.stash[_STATE] = _HarnessState(config)


def pytest_itemcollected(item):
    spec = _mpi_spec(item)
    if spec is None:
        return
    n = _nranks(item)
    item.extra_keyword_matches.add(f"np{n}")  # so that `-k np2` works
    if item.config.pluginmanager.hasplugin("timeout"):
        # The harness enforces per-case limits itself; the first item of a launch
        # waits for the whole launch, which pytest-timeout must not cut short.
        item.add_marker(pytest.mark.timeout(0))


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem):
    if _mpi_spec(pyfuncitem) is None:
        return None
    state = pyfuncitem.config.stash[_STATE]
    res = state.result_for(pyfuncitem)
    for rank in sorted(res.outputs):
        text = res.outputs[rank]
        if text.strip():
            pyfuncitem.add_report_section("call", f"stdout+stderr (rank {rank})", text)
    if res.status == "passed":
        return True
    if res.status == "skipped":
        pytest.skip(res.message)
    state.any_failed = True
    pytest.fail(res.message, pytrace=False)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    state = config.stash.get(_STATE, None)
    if state is not None and state.any_failed and state.base is not None:
        terminalreporter.write_line(f"MPI harness: per-rank logs of the launches are in "
                                    f"{state.base}")


def pytest_unconfigure(config):
    state = config.stash.get(_STATE, None)
    if state is not None:
        state.cleanup()


def _nranks(item) -> int:
    commname = list(inspect.signature(item.function).parameters)[0]
    return int(item.callspec.params[commname])


def _will_be_skipped(item) -> bool:
    try:
        from _pytest.skipping import evaluate_skip_marks
        return evaluate_skip_marks(item) is not None
    except Exception:  # internal API moved: fall back on the plain skip mark
        return item.get_closest_marker("skip") is not None


def _module_import_info(item):
    mod = item.module
    path = Path(mod.__file__).resolve()
    name = mod.__name__
    parts = name.split(".")
    basedir = None
    if len(path.parents) >= len(parts):
        cand = path.parents[len(parts) - 1]
        if (cand.joinpath(*parts[:-1]) / (parts[-1] + ".py")).resolve() == path:
            basedir = str(cand)
    return {"name": name, "path": str(path), "basedir": basedir}


class _HarnessState:
    def __init__(self, config):
        self.config = config
        self.results = {}       # nodeid -> CaseResult
        self.base = None
        self.own_base = False
        self.any_failed = False
        self.counter = 0

    def _launch_dir(self, label):
        if self.base is None:
            root = os.environ.get("DISTCONV_TEST_OUTDIR")
            if root:
                Path(root).mkdir(parents=True, exist_ok=True)
                self.base = Path(tempfile.mkdtemp(prefix="mpi-", dir=root))
            else:
                self.base = Path(tempfile.mkdtemp(prefix="distconv-mpi-"))
                self.own_base = True
        self.counter += 1
        d = self.base / f"{self.counter:03d}-{label}"
        d.mkdir()
        return d

    def cleanup(self):
        if self.base is not None and self.own_base and not self.any_failed:
            shutil.rmtree(self.base, ignore_errors=True)

    def result_for(self, item) -> CaseResult:
        if item.nodeid not in self.results:
            key = (str(item.path), _nranks(item))
            batch = [it for it in item.session.items
                     if it is item or (_mpi_spec(it) is not None
                                       and (str(it.path), _nranks(it)) == key
                                       and it.nodeid not in self.results
                                       and not _will_be_skipped(it))]
            self._run_batch(batch, key[1])
        return self.results[item.nodeid]

    def _run_batch(self, items, nranks):
        remaining = list(items)
        while remaining:
            remaining = self._launch(remaining, nranks)

    def _launch(self, items, nranks):
        """Run ``items`` in one mpiexec; store results; return the items to run again."""
        info = _module_import_info(items[0])
        cases = []
        for it in items:
            spec = _mpi_spec(it)
            cases.append({"nodeid": it.nodeid, "func": it.originalname,
                          "params": _case_indices(it), "timeout": spec["timeout"]})
        label = f"{info['name'].rsplit('.', 1)[-1]}-np{nranks}"
        d = self._launch_dir(label)
        spec_path = d / "spec.json"
        spec_path.write_text(json.dumps({"module": info, "cases": cases, "outdir": str(d)}))
        cmd = mpiexec_command(nranks) + [sys.executable, "-m", "mpi4py", "-m",
                                         "tests.mpi_harness", str(spec_path)]
        limit = STARTUP_ALLOWANCE + sum(c["timeout"] + FAIL_GRACE + 2 for c in cases)
        t0 = time.time()
        rc, out, err, killed = _run_job(cmd, limit, env=child_env(),
                                        pids_of=lambda: _read_pids(d, nranks))
        t_end = time.time()
        (d / "mpiexec.out").write_text(out or "")
        (d / "mpiexec.err").write_text(err or "")

        records = _read_records(d, nranks)
        logs = {r: _split_log(d / f"rank{r}.log") for r in range(nranks)}
        cmdline = shlex.join(cmd)
        where = f"command: {cmdline}\nlaunch folder: {d}"
        job_tail = (f"mpiexec exit code {rc}"
                    + (f" (killed after the overall limit of {limit:.0f}s)" if killed else ""))
        for label_, text_ in (("stdout", out), ("stderr", err)):
            if (text_ or "").strip():
                job_tail += f"\n--- mpiexec {label_} ---\n{_tail(text_, 3000)}"

        culprit = None
        for i, (it, case) in enumerate(zip(items, cases)):
            recs = records.get(i, {})
            outputs = {r: logs[r].get(i, "") for r in range(nranks) if i in logs[r]}
            results = {r: x for r, x in recs.get("result", {}).items()}
            started = recs.get("start", {})
            name = it.name
            if len(results) == nranks:
                self.results[it.nodeid] = _combine(name, nranks, results, outputs, where)
            elif started or results:
                culprit = i
                self.results[it.nodeid] = _broken(name, nranks, case, recs, outputs, where,
                                                  job_tail, t_end - min(
                                                      [x["t"] for x in started.values()]
                                                      or [t0]))
                break
            else:
                break
        n_done = sum(1 for it in items if it.nodeid in self.results)
        rest = items[n_done:]
        if rest and culprit is None:
            # The job died before (or between) cases with nothing to blame: fail the rest.
            msg = f"the MPI job ended before running this case\n{where}\n{job_tail}"
            for it in rest:
                self.results[it.nodeid] = CaseResult("failed", msg)
            return []
        return rest


def _read_pids(d: Path, nranks: int):
    pids = []
    for r in range(nranks):
        for rec in _read_jsonl(d / f"rank{r}.jsonl"):
            if rec.get("event") == "hello":
                pids.append(int(rec["pid"]))
    return pids


def _read_jsonl(path: Path):
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return []
    out = []
    for line in lines:
        with contextlib.suppress(ValueError):
            out.append(json.loads(line))
    return out


def _read_records(d: Path, nranks: int):
    """{case index: {event: {rank: record}}} from the per-rank record files."""
    recs = {}
    for r in range(nranks):
        for rec in _read_jsonl(d / f"rank{r}.jsonl"):
            if "case" in rec:
                recs.setdefault(rec["case"], {}).setdefault(rec["event"], {})[r] = rec
    return recs


def _split_log(path: Path):
    """{case index: text} cut at the harness's case markers."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return {}
    chunks = {}
    cur, buf = None, []
    for line in text.splitlines(keepends=True):
        s = line.strip()
        if s.startswith("@@distconv-mpi-case ") and s.endswith("@@"):
            if buf and buf[-1] == "\n":
                buf.pop()  # the newline the marker starts with
            nxt = int(s[len("@@distconv-mpi-case "):-2])
            if cur is not None:
                chunks[cur] = "".join(buf)
                buf = []
            # else: output before the first case (imports) is kept for that case
            cur = nxt
        else:
            buf.append(line)
    if buf or cur is not None:
        chunks[0 if cur is None else cur] = "".join(buf)
    return chunks


def _group_tracebacks(results):
    groups = {}
    for r, rec in sorted(results.items()):
        if rec.get("status") == "failed":
            groups.setdefault(rec.get("tb") or "(no traceback)", []).append(r)
    parts = []
    for tb, ranks in groups.items():
        who = f"rank {ranks[0]}" if len(ranks) == 1 else "ranks " + ",".join(map(str, ranks))
        parts.append(f"---- {who} ----\n{tb.rstrip()}")
    return parts


def _combine(name, nranks, results, outputs, where) -> CaseResult:
    failed = sorted(r for r, x in results.items() if x["status"] == "failed")
    if failed:
        ranks = ",".join(map(str, failed))
        msg = "\n".join([f"MPI case {name} failed on rank(s) {ranks} of {nranks}"]
                        + _group_tracebacks(results) + [where])
        return CaseResult("failed", msg, outputs)
    skipped = [x for x in results.values() if x["status"] == "skipped"]
    if skipped:
        return CaseResult("skipped", skipped[0].get("msg") or "skipped", outputs)
    return CaseResult("passed", "", outputs)


def _ranks(rs) -> str:
    return ",".join(map(str, rs)) or "none"


def _broken(name, nranks, case, recs, outputs, where, job_tail, ran_for) -> CaseResult:
    results = recs.get("result", {})
    unfinished = [r for r in range(nranks) if r not in results]
    timeouts = recs.get("timeout", {})
    aborts = recs.get("abort", {})
    if timeouts:
        head = (f"MPI case {name} timed out after {case['timeout']:g}s (hang?) on rank(s) "
                f"{','.join(map(str, sorted(timeouts)))}; the job was aborted "
                f"{ran_for:.1f}s after the case started; rank(s) that did not finish it: "
                f"{_ranks(unfinished)}. Each rank's stack is in its output section.")
    elif aborts:
        head = (f"MPI case {name} failed on rank(s) {','.join(map(str, sorted(aborts)))} "
                f"while rank(s) {_ranks(unfinished)} stayed inside the case (waiting for the "
                f"failed rank?); the job was aborted after {FAIL_GRACE:g}s")
    else:
        head = (f"MPI case {name}: the MPI job died during this case "
                f"({ran_for:.1f}s after it started); rank(s) that did not finish it: "
                f"{_ranks(unfinished)}")
    msg = "\n".join([head] + _group_tracebacks(results) + [where, job_tail])
    return CaseResult("failed", msg, outputs)


_STATE = pytest.StashKey[_HarnessState]()


# --------------------------------------------------------------------------- child side

def _rewrite_and_compile(path: str):
    """The module's code with pytest's assertion rewriting, or None if unavailable."""
    try:
        import ast

        from _pytest.assertion import util as _util
        from _pytest.assertion.rewrite import rewrite_asserts
        src = Path(path).read_bytes()
        tree = ast.parse(src, filename=path)
        rewrite_asserts(tree, src, path, None)
        code = compile(tree, path, "exec", dont_inherit=True)
    except Exception:
        return None
    try:
        from _pytest.assertion.util import assertrepr_compare

        class _Cfg:  # just enough of a pytest Config for assertrepr_compare
            def get_verbosity(self, *a, **k):
                return 0

            def getoption(self, *a, **k):
                return 0

            def getini(self, *a, **k):
                return 0

            def get_terminal_writer(self):
                return self

            def _highlight(self, source, lexer="python"):
                return source

        def _reprcompare(op, left, right):
            try:
                lines = assertrepr_compare(_Cfg(), op, left, right)
            except Exception:
                return None
            return "\n~".join(lines) if lines else None

        _util._reprcompare = _reprcompare
    except Exception:
        pass
    return code


def _import_test_module(info):
    import importlib
    import importlib.util
    name, path, basedir = info["name"], info["path"], info["basedir"]
    if basedir and basedir not in sys.path:
        sys.path.insert(0, basedir)
    if "." in name and basedir:
        importlib.import_module(name.rpartition(".")[0])
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    code = _rewrite_and_compile(path)
    if code is not None:
        exec(code, mod.__dict__)
    else:
        spec.loader.exec_module(mod)
    return mod


def _is_param_set(v) -> bool:
    try:
        from _pytest.mark.structures import ParameterSet
        return isinstance(v, ParameterSet)
    except ImportError:  # pragma: no cover - internal name moved
        return type(v).__name__ == "ParameterSet"


def _parametrize_marks(fn, mod):
    """The parametrize marks of an MPI case, in a fixed order (function's, then module's)."""
    marks = list(getattr(fn, "pytestmark", []))
    modmarks = getattr(mod, "pytestmark", [])
    marks += modmarks if isinstance(modmarks, list) else [modmarks]
    return [m for m in marks if getattr(m, "name", None) == "parametrize"]


def _mark_values(m):
    """[(argnames, [tuple of values per parameter set])] of one parametrize mark."""
    names = _param_names([m])
    values = m.args[1] if len(m.args) > 1 else m.kwargs["argvalues"]
    rows = []
    for raw in values:
        if _is_param_set(raw):
            rows.append(tuple(raw.values))
        else:
            rows.append((raw,) if len(names) == 1 else tuple(raw))
    return names, rows


def _case_indices(item):
    """Parent side: for each parametrize mark, which parameter set this item uses."""
    out = []
    for m in _parametrize_marks(item.function, item.module):
        names, rows = _mark_values(m)
        got = tuple(item.callspec.params.get(n, _MISSING) for n in names)
        if _MISSING in got:
            out.append(None)
            continue
        idx = next((k for k, row in enumerate(rows)
                    if all(a is b for a, b in zip(row, got))), None)
        if idx is None:  # fall back on equality (values rebuilt by pytest)
            idx = next((k for k, row in enumerate(rows) if _safe_eq(row, got)), None)
        if idx is None:
            raise pytest.UsageError(f"{item.nodeid}: cannot map the parametrize values of this "
                                    "MPI case back to their marks")
        out.append(idx)
    return out


_MISSING = object()


def _safe_eq(a, b) -> bool:
    try:
        return bool(a == b)
    except Exception:
        return False


def _case_kwargs(fn, mod, indices):
    """Child side: rebuild the parametrize arguments of one case from their indices."""
    kwargs = {}
    for m, idx in zip(_parametrize_marks(fn, mod), indices):
        if idx is None:
            continue
        names, rows = _mark_values(m)
        kwargs.update(zip(names, rows[idx]))
    return kwargs


def _child_main(spec_path: str) -> None:
    import faulthandler

    from mpi4py import MPI

    spec = json.loads(Path(spec_path).read_text())
    world = MPI.COMM_WORLD
    rank = world.rank
    d = Path(spec["outdir"])
    sys.stdout.flush()
    sys.stderr.flush()
    logfd = os.open(d / f"rank{rank}.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(logfd, 1)
    os.dup2(logfd, 2)
    os.close(logfd)
    recfile = open(d / f"rank{rank}.jsonl", "a", buffering=1)
    lock = threading.Lock()

    def record(**kw):
        with lock:
            recfile.write(json.dumps(kw) + "\n")
            recfile.flush()

    record(event="hello", pid=os.getpid())
    harness = world.Dup()
    cases = spec["cases"]
    try:
        mod = _import_test_module(spec["module"])
        import_error = None
    except BaseException:
        mod, import_error = None, "error importing the test module:\n" + traceback.format_exc()

    for i, case in enumerate(cases):
        sys.stdout.flush()
        sys.stderr.flush()
        os.write(1, _MARK.format(i).encode())
        record(event="start", case=i, t=time.time())
        tmo = case["timeout"]
        t0 = time.monotonic()

        def fire(i=i, case=case, tmo=tmo):
            record(event="timeout", case=i)
            with contextlib.suppress(Exception):
                sys.stdout.flush()
                sys.stderr.flush()
            os.write(2, (f"\n*** distconv mpi harness: case {case['nodeid']} exceeded its "
                         f"timeout of {tmo:g}s on rank {rank} (hang?); aborting the job.\n"
                         ).encode())
            try:
                os.write(2, _stacks_text(rank).encode())
            except Exception:
                faulthandler.dump_traceback(file=2, all_threads=True)
            time.sleep(1.0)  # let the other ranks print their stacks too
            world.Abort(1)

        dog = threading.Timer(tmo, fire)
        dog.daemon = True
        dog.start()
        status, tb, msg = "passed", None, None
        comm = None
        be = sys.modules.get("distconv.backend")
        saved_dtype = _get_dtype(be)
        try:
            if import_error:
                raise RuntimeError(import_error)
            fn = getattr(mod, case["func"])
            kwargs = _case_kwargs(fn, mod, case["params"])
            comm = world.Dup()
            fn(comm, **kwargs)
        except pytest.skip.Exception as e:
            status, msg = "skipped", str(getattr(e, "msg", e))
        except BaseException as e:
            status = "failed"
            tbobj = e.__traceback__.tb_next if e.__traceback__ is not None else None
            tb = "".join(traceback.format_exception(type(e), e, tbobj))
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        record(event="result", case=i, status=status, tb=tb, msg=msg,
               dt=time.monotonic() - t0)
        # Wait for every rank to finish the case. A rank that did not pass gives the
        # others FAIL_GRACE seconds: if they are stuck waiting for it, abort now.
        req = harness.Ibarrier()
        deadline = None if status == "passed" else time.monotonic() + min(
            FAIL_GRACE, max(0.0, tmo - (time.monotonic() - t0)))
        while not req.Test():
            if deadline is not None and time.monotonic() > deadline:
                dog.cancel()
                record(event="abort", case=i)
                os.write(2, (f"\n*** distconv mpi harness: case {case['nodeid']} "
                             f"{status} on rank {rank} while other ranks are still in it; "
                             "aborting the job.\n").encode())
                world.Abort(1)
            time.sleep(0.0005)
        dog.cancel()
        if comm is not None:
            with contextlib.suppress(Exception):
                comm.Free()
        _set_dtype(sys.modules.get("distconv.backend"), saved_dtype)
    sys.stdout.flush()
    sys.stderr.flush()
    record(event="done")
    recfile.close()
    harness.Free()

    def stuck_at_exit():
        os.write(2, b"\n*** distconv mpi harness: MPI_Finalize did not return within 30 s "
                    b"(requests left pending by a case?); exiting.\n")
        os._exit(70)

    last = threading.Timer(30.0, stuck_at_exit)
    last.daemon = True
    last.start()


def _stacks_text(rank: int) -> str:
    """Where each thread of this rank is (the watchdog's own thread left out)."""
    me = threading.get_ident()
    names = {t.ident: t.name for t in threading.enumerate()}
    parts = []
    for ident, frame in sys._current_frames().items():
        if ident == me:
            continue
        frames = traceback.extract_stack(frame)
        cut = [k for k, f in enumerate(frames) if f.name == "_child_main"
               and f.filename.endswith("mpi_harness.py")]
        if cut:
            if cut[-1] == len(frames) - 1:
                parts.append(f"rank {rank} ({names.get(ident, ident)}): finished the case, "
                             "waiting in the harness for the other ranks\n")
                continue
            frames = frames[cut[-1] + 1:]
        parts.append(f"Stack of rank {rank} ({names.get(ident, ident)}), most recent call "
                     "last:\n" + "".join(traceback.format_list(frames)))
    return "".join(parts)


def _get_dtype(be):
    try:
        return be.get_default_dtype() if be is not None else None
    except Exception:
        return None


def _set_dtype(be, dtype):
    if be is None:
        return
    with contextlib.suppress(Exception):
        import numpy as np
        be.set_default_dtype(dtype if dtype is not None else np.float32)


if __name__ == "__main__":  # the MPI child: python -m mpi4py -m tests.mpi_harness SPEC
    _child_main(sys.argv[1])
