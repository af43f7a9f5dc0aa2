"""The training run of ``scripts/train.py``: epochs of distributed steps with checkpoints,
metrics, signals, non-finite checks, replica checks and an optional profile.

:class:`Trainer` takes a built model (any strategy or plan), the train and test
:class:`~distconv.data.H5Dataset` and the run's settings (``scripts/train.py``'s parsed
command line: the attributes listed in :class:`Trainer`), and runs :meth:`Trainer.fit`:
every rank the same loop, rank 0 printing and writing ``OUT/metrics.jsonl``. A training
loop of your own needs none of this (``scripts/custom_loop.py``).

Signals: :func:`install_stop_signals` makes SIGTERM/SIGUSR1 stop the run at the next
step boundary with a checkpoint. Faults for tests come from ``DISTCONV_FAULT``
(:func:`parse_fault`).
"""
from __future__ import annotations

import json
import os
import signal
import time

import numpy as np

from .atomic import write_text

STOP = {"signal": None}  # set by SIGTERM/SIGUSR1; acted on at the next step boundary


def _on_signal(signum, frame):
    STOP["signal"] = signum


def install_stop_signals() -> None:
    """SIGTERM and SIGUSR1 (e.g. ``sbatch --signal=USR1@120``) stop the run at the next
    step boundary, every rank writing the checkpoint, exit code 0."""
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, _on_signal)


def parse_fault(text: str | None) -> dict:
    """``DISTCONV_FAULT`` (testing only): ``raise@rank=1,step=3`` (that rank raises at the
    start of that step), ``kill@rank=1,step=3`` (it dies with SIGKILL), or
    ``checkpoint@epoch=2`` (rank 0 fails between writing and renaming that epoch's
    checkpoint), or ``diverge@rank=1,step=3`` (after that step's update, that rank adds
    1e-6 to its copy of the first parameter: replicas that differ)."""
    if not text:
        return {}
    kind, _, rest = text.partition("@")
    out = {"kind": kind}
    for part in filter(None, rest.split(",")):
        k, _, v = part.partition("=")
        out[k] = int(v)
    if kind not in ("raise", "kill", "checkpoint", "diverge"):
        raise ValueError(f"DISTCONV_FAULT: unknown fault {kind!r} in {text!r}")
    return out


class Trainer:
    """One training run.

    ``args`` attributes read: ``model`` (its name, kept in checkpoints), ``strategy``,
    ``batch_size``, ``epochs``, ``lr``, ``momentum``, ``weight_decay``, ``optimizer``
    (``"sgd"``/``"adam"``), ``warmup_epochs``, ``seed``, ``out``, ``resume``,
    ``log_every``, ``no_overlap``, ``bucket_kb``, ``checkpoint_every``,
    ``skip_nonfinite``, ``check_replicas_every``, ``max_steps``, ``profile``, ``dtype``.
    ``in_dist``: where each batch lies (the first conv's input distribution); ``say``: a
    print on rank 0; ``fault``: :func:`parse_fault`'s dict.
    """

    def __init__(self, args, comm, model, train_set, test_set, in_dist, say, fault=None):
        from . import data, optim
        from .nn import CrossEntropyLoss, Dropout
        self.args, self.comm, self.model, self.say = args, comm, model, say
        self.test_set, self.in_dist, self.fault = test_set, in_dist, fault or {}
        self.loader = data.DistLoader(train_set, args.batch_size, in_dist, shuffle=True,
                                      seed=args.seed)
        self.steps_per_epoch = len(self.loader)
        if args.optimizer == "sgd":
            self.opt = optim.SGD(model.parameters(), args.lr, momentum=args.momentum,
                                 weight_decay=args.weight_decay)
        else:
            self.opt = optim.Adam(model.parameters(), args.lr, weight_decay=args.weight_decay)
        total = args.epochs * self.steps_per_epoch
        warm = int(args.warmup_epochs * self.steps_per_epoch)
        self.sched = optim.LinearWarmup(
            self.opt, warm, after=optim.CosineAnnealingLR(self.opt, max(1, total - warm)))
        self.sync = optim.GradientSync(model, self.opt, bucket_bytes=args.bucket_kb << 10,
                                       overlap=not args.no_overlap)
        self.crit = CrossEntropyLoss()
        self.prof = None
        if args.profile:
            from .profile import Profiler
            # after GradientSync: its backward hooks are timed
            self.prof = Profiler(model, sync=self.sync)
        self.dropouts = [(n, m) for n, m in model.named_modules() if isinstance(m, Dropout)]
        self.named = list(model.named_parameters())
        self.ckpt_path = os.path.join(args.out, "checkpoint.h5")
        self.metrics_path = os.path.join(args.out, "metrics.jsonl")
        self.start_epoch, self.step = 0, 0

    # ------------------------------------------------------------------ files
    def open_run(self) -> None:
        """Create OUT; with ``--resume`` restore model, optimizer, schedule, loader and
        dropout steps from OUT/checkpoint.h5, else start a new metrics file."""
        from . import checkpoint
        if self.comm.rank == 0:
            os.makedirs(self.args.out, exist_ok=True)
        self.comm.barrier()
        if self.args.resume:
            meta = checkpoint.load_checkpoint(self.ckpt_path, self.model, self.opt, self.sched)
            if meta.get("model") != self.args.model:
                raise ValueError(f"{self.ckpt_path} holds a {meta.get('model')!r} model, not "
                                 f"{self.args.model!r}")
            self.step = int(meta["step"])
            for n, m in self.dropouts:  # the dropout masks continue where they were
                m.step = int(meta.get("dropout_steps", {}).get(n, 0))
            self.loader.load_state_dict(meta["loader"])
            self.start_epoch = self.loader.position()[0]
            self.say(f"resumed from {self.ckpt_path}: epoch {self.start_epoch}, "
                     f"step {self.step}")
        elif self.comm.rank == 0:
            open(self.metrics_path, "w").close()

    def log(self, rec) -> None:
        if self.comm.rank == 0:
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps(rec) + "\n")

    def save(self, epoch) -> None:
        from . import checkpoint
        if self.fault.get("kind") == "checkpoint" and self.fault.get("epoch") == epoch:
            def fail(tmp):
                raise OSError(f"injected fault (DISTCONV_FAULT) before renaming {tmp}")
            checkpoint._before_rename = fail
        checkpoint.save_checkpoint(self.ckpt_path, self.model, self.opt, self.sched, meta={
            "epoch": epoch, "step": self.step, "model": self.args.model,
            "strategy": self.args.strategy, "loader": self.loader.state_dict(),
            "seed": self.args.seed, "args": vars(self.args),
            "dropout_steps": {n: m.step for n, m in self.dropouts}})

    # ------------------------------------------------------------------ pieces
    def evaluate(self):
        """Test accuracy (None without test data)."""
        from . import backend, data
        from .autograd import no_grad
        if self.test_set is None:
            return None
        self.model.eval()
        tl = data.DistLoader(self.test_set, self.args.batch_size, self.in_dist, shuffle=False)
        correct = n = 0
        for x, y in tl:
            with no_grad():
                logits = backend.to_numpy(self.model(x).to_global())
            correct += int((logits.argmax(1) == y).sum())
            n += len(y)
        self.model.train()
        return correct / max(n, 1)

    def report_profile(self) -> None:
        """Collective (every rank calls it): rank 0 prints its per-layer table and writes
        OUT/profile.json with the summaries of all ranks."""
        prof, comm = self.prof, self.comm
        if prof is None:
            return
        skip = 1 if len(prof.steps) > 1 else 0
        per_rank = comm.allgather_obj(prof.summary(skip))
        if comm.rank != 0:
            return
        keys = ("wall_s", "comm_s", "exposed_comm_s", "bytes_sent")
        worst = {k: max(s["per_step"][k] for s in per_rank) for k in keys}
        path = os.path.join(self.args.out, "profile.json")
        write_text(path, json.dumps({"ranks": comm.size, "skip": skip, "per_rank": per_rank,
                                     "max_over_ranks": worst}, indent=1))
        print(f"profile of rank 0, per-step means over {per_rank[0]['nsteps']} step(s)"
              f"{' (first step skipped)' if skip else ''}:", flush=True)
        print(prof.table(skip), flush=True)
        print(f"max over {comm.size} rank(s), per step: wall {1e3 * worst['wall_s']:.3f} ms, "
              f"comm {1e3 * worst['comm_s']:.3f} ms, exposed comm "
              f"{1e3 * worst['exposed_comm_s']:.3f} ms, sent {worst['bytes_sent'] / 1e3:.1f} kB;"
              f" all ranks in {path}", flush=True)

    def _checks(self, loss):
        """``(names of what is not finite this step, stop requested)``, agreed on all ranks
        with one tiny allreduce: a non-finite gradient on any rank, or a SIGTERM/SIGUSR1
        that reached any rank."""
        from .backend import get_xp
        xp = get_xp()
        mine = [n for n, p in self.named  # a rank off a placed layer holds no gradient values
                if p.grad is not None and p.grad.grid.member
                and not bool(xp.isfinite(p.grad.local).all())]
        flag = self.comm.allreduce(np.asarray([1.0 if mine else 0.0,
                                               1.0 if STOP["signal"] else 0.0]), op="max")
        out = [] if np.isfinite(loss) else ["loss"]  # the loss is the same on every rank
        if flag[0]:
            out += sorted({n.rpartition(".")[0] or n
                           for r in self.comm.allgather_obj(mine) for n in r})
        return out, bool(flag[1])

    def _inject(self, when: str) -> None:
        """``DISTCONV_FAULT`` on this rank: ``"start"`` of step ``self.step + 1`` (raise
        or kill), ``"after"`` step ``self.step`` (diverge)."""
        f = self.fault
        if f.get("rank") != self.comm.rank:
            return
        if when == "start" and f.get("kind") in ("raise", "kill") \
                and f.get("step") == self.step + 1:
            if f["kind"] == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            raise RuntimeError(f"injected fault (DISTCONV_FAULT) at step {self.step + 1}")
        if when == "after" and f.get("kind") == "diverge" and f.get("step") == self.step:
            self.named[0][1].data.local.reshape(-1)[:1] += 1e-6  # a view (NumPy or CuPy)

    def train_step(self, x, y, epoch):
        """One step -> ``(logits, loss, stop requested)``: forward (Inception-v3's
        auxiliary loss weighted 0.4), backward, the non-finite and signal checks, the
        update (or, with ``--skip-nonfinite``, the step undone)."""
        args = self.args
        self._inject("start")
        self.opt.zero_grad()
        running = ([(b, b.local.copy()) for _, b in self.model.named_buffers()]
                   if args.skip_nonfinite else [])
        if self.prof is not None:
            self.prof.step_begin()
        logits = self.model(x)
        if isinstance(logits, tuple):  # Inception-v3's (logits, aux_logits) in training
            loss = self.crit(logits[0], y) + 0.4 * self.crit(logits[1], y)
            logits = logits[0]
        else:
            loss = self.crit(logits, y)
        loss.backward()
        bad, stop = self._checks(loss)
        if bad:
            self._skip_or_stop(bad, epoch, running)
        else:
            self.opt.step()
            self.sched.step()
        if self.prof is not None:
            self.prof.step_end()
        self.step += 1
        self._inject("after")
        if args.check_replicas_every and self.step % args.check_replicas_every == 0:
            from .replicas import ReplicaMismatchError, check_replicas
            try:
                check_replicas(self.model, self.opt)
            except ReplicaMismatchError as e:  # raised on every rank alike
                raise ReplicaMismatchError(f"step {self.step} (epoch {epoch + 1}): {e}; "
                                           f"training stopped") from None
        return logits, loss, stop

    def _skip_or_stop(self, bad, epoch, running) -> None:
        self.sync.wait()  # finish the allreduces in flight before leaving the step
        where = (f"step {self.step + 1} (epoch {epoch + 1}): non-finite values in "
                 f"{', '.join(bad)}")
        if not self.args.skip_nonfinite:
            kept = (f"the last good checkpoint {self.ckpt_path} is kept"
                    if os.path.exists(self.ckpt_path) else "no checkpoint was written yet")
            raise FloatingPointError(f"{where}; training stopped, {kept}")
        self.say(f"skipping {where} (--skip-nonfinite)")
        self.log({"kind": "skipped", "epoch": epoch + 1, "step": self.step + 1,
                  "reason": where})
        self.opt.zero_grad()
        for b, saved in running:  # this step's batch statistics are not kept either
            b.local[...] = saved

    # ------------------------------------------------------------------ the run
    def fit(self) -> int:
        """Every epoch from where the run stands; returns the exit code (0)."""
        t_run = time.perf_counter()
        for epoch in range(self.start_epoch, self.args.epochs):
            done = self._epoch(epoch, t_run)
            if done == "signal":
                return 0
            if done:
                break
        self.say(f"finished in {time.perf_counter() - t_run:.1f} s; gradient allreduce: "
                 f"{self.sync.bytes / 2**20:.1f} MiB in buckets, {self.sync.exposed_time:.2f} "
                 f"s exposed (blocked in opt.step); checkpoint {self.ckpt_path}, metrics "
                 f"{self.metrics_path}")
        self.report_profile()
        return 0

    def _epoch(self, epoch, t_run):
        """One epoch -> ``"signal"`` (stopped by a signal), True (``--max-steps``
        reached) or False."""
        from .backend import to_numpy
        args, comm = self.args, self.comm
        self.loader.set_epoch(epoch)
        t_ep = time.perf_counter()
        win = _Window()
        comm.reset_stats()
        done = False
        for x, y in self.loader:
            logits, loss, stop = self.train_step(x, y, epoch)
            win.add(loss, int((to_numpy(logits.to_global()).argmax(1) == y).sum()), len(y))
            if self.step % args.log_every == 0 or \
                    self.loader.position()[1] == self.steps_per_epoch:
                self._log_window(epoch, win)
                win = _Window()
            if args.checkpoint_every and self.step % args.checkpoint_every == 0 and not stop:
                self.save(epoch + 1)
            if stop:
                self.save(epoch + 1)  # the loader's position says where to continue
                name = signal.Signals(STOP["signal"]).name if STOP["signal"] else "a signal"
                self.say(f"{name} received (on some rank): checkpoint written at step "
                         f"{self.step} to {self.ckpt_path}; exiting 0, continue with --resume")
                self.report_profile()
                return "signal"
            if args.max_steps is not None and self.step >= args.max_steps:
                done = True
                break
        acc = self.evaluate()
        ep_t = time.perf_counter() - t_ep
        self.say(f"epoch {epoch + 1} done in {ep_t:.1f} s: test accuracy "
                 f"{'n/a' if acc is None else f'{100 * acc:.2f}%'}")
        self.log({"kind": "epoch", "epoch": epoch + 1, "step": self.step,
                  "test_accuracy": acc, "epoch_time": ep_t,
                  "elapsed": time.perf_counter() - t_run,
                  "exposed_allreduce_time": self.sync.exposed_time})
        self.save(epoch + 1)
        return done

    def _log_window(self, epoch, win) -> None:
        dt = time.perf_counter() - win.t0
        st = self.comm.stats()
        rec = {"kind": "step", "epoch": epoch + 1, "step": self.step,
               "loss": win.loss / win.steps, "accuracy": win.correct / max(win.n, 1),
               "images_per_s": win.n / dt, "comm_share": st["total"]["time"] / dt,
               "lr": self.opt.lr, "bytes_sent": st["total"]["bytes_sent"]}
        self.say(f"epoch {epoch + 1} step {self.step} loss {rec['loss']:.4f} "
                 f"acc {rec['accuracy']:.3f} {rec['images_per_s']:.0f} img/s "
                 f"comm {100 * rec['comm_share']:.0f}% lr {self.opt.lr:.4f}")
        self.log(rec)
        self.comm.reset_stats()


class _Window:
    """Loss, accuracy and timing since the last progress line."""

    def __init__(self):
        self.t0, self.n, self.loss, self.correct, self.steps = time.perf_counter(), 0, 0.0, 0, 0

    def add(self, loss, correct, n):
        self.loss += loss
        self.correct += correct
        self.n += n
        self.steps += 1
