#!/usr/bin/env python
"""Search time of ``dc.planner.plan_model``, checkouts side by side.

    python scripts/bench_search_time.py --code new=. --code filed=/tmp/filed \\
        --case resnet50:1024:1024 --case resnet50:16:256 --rounds 5 --json t.json

(``git worktree add /tmp/filed <commit>`` gives an older checkout.) Each measurement is
a fresh Python process with ``PYTHONPATH`` set to one checkout: it builds the model
(torchvision-named, ImageNet stem, 1000 classes; Inception-v3 on 299x299) and plans it
for the case's ranks and global batch on the ``v100_ib`` machine file, float32, with
fitted kernel times (nothing measured) and the machine's memory limit. It reports the
CPU seconds around ``plan_model``, the ``search_s`` it returns, and a digest of what it
returned (plans, predictions, data parallelism's step, candidates, choice): equal
digests mean equal plans and predictions. In each round every checkout runs each case
in turn, so the shared machine's drift hits them alike; each code's ratio to the first
``--code`` is taken within a round, and the table shows its median over the rounds.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

# what a child process runs: only names every checkout since the planner's first round has
CHILD = r"""
import hashlib, json, sys, time
from distconv import models
from distconv.planner import auto
from distconv.planner.compute import ComputeModel
from distconv.planner.machine import Machine, builtin
name, ranks, batch = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
shape = (3, 299, 299) if name == "inception_v3" else (3, 224, 224)
if name in models.MODELS:
    model = models.MODELS[name](1000, in_channels=3, stem="imagenet")
else:
    model = models.CNN_MODELS[name](1000, in_channels=3, init_weights=False, aux_logits=True)
m = Machine.load(builtin("v100_ib"))
comp = m.compute or {}
kw = {"scale": float(comp.get("scale") or 1.0), "dtype": "float32"}
if comp.get("rates"):
    kw["rates"] = comp["rates"]
compute = ComputeModel(cache_path=None, measure=False, **kw)
c0 = time.process_time()
res = auto.plan_model(model, (batch,) + shape, ranks, m, compute=compute,
                      memory_limit=m.memory_per_rank)
c1 = time.process_time()
plan = {k: list(v) for k, v in sorted(res["plan"].items())}
fast = {k: list(v) for k, v in sorted(res["fastest_plan"].items())}
pred = {k: v for k, v in res["predicted"].items() if k != "layers"}
digest = hashlib.sha1(json.dumps([plan, fast, repr(pred), repr(res["dp"]["step_s"]),
                                  repr(sorted(res["candidates"].items())), res["chosen"]],
                                 sort_keys=True).encode()).hexdigest()
import distconv
print(json.dumps({"cpu_plan_model_s": c1 - c0, "search_s": res["search_s"],
                  "chosen": res["chosen"], "digest": digest, "distconv": distconv.__file__}))
"""


def _code(text):
    name, sep, path = text.partition("=")
    if not sep or not name or not os.path.isdir(os.path.join(path, "distconv")):
        raise argparse.ArgumentTypeError(
            f"expected NAME=CHECKOUT, a directory holding distconv/, got {text!r}")
    return name, os.path.abspath(path)


def _case(text):
    parts = text.split(":")
    if len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts[1:]):
        raise argparse.ArgumentTypeError(f"expected MODEL:RANKS:BATCH, got {text!r}")
    return parts[0], int(parts[1]), int(parts[2])


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--code", type=_code, action="append", required=True,
                   help="NAME=CHECKOUT, repeated; the first is the one the others are "
                        "compared with")
    p.add_argument("--case", type=_case, action="append", default=None,
                   help="MODEL:RANKS:BATCH, repeated (default resnet50:1024:1024)")
    p.add_argument("--rounds", type=int, default=5, help="rounds over every code and case")
    p.add_argument("--json", help="write every run and the summary here")
    a = p.parse_args(argv)
    a.case = a.case or [("resnet50", 1024, 1024)]
    if a.rounds < 1:
        p.error(f"--rounds must be >= 1, got {a.rounds}")
    return a


def measure(path, case) -> dict:
    """One child process planning ``case`` with the checkout at ``path`` (run from there:
    ``python -c`` puts its working directory first on ``sys.path``)."""
    env = dict(os.environ, PYTHONPATH=path, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", CHILD] + [str(x) for x in case], env=env,
                         cwd=path, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"planning {case} with {path} failed:\n{out.stderr[-2000:]}")
    got = json.loads(out.stdout.strip().splitlines()[-1])
    if os.path.commonpath([path, os.path.abspath(got["distconv"])]) != path:
        raise RuntimeError(f"the run meant for {path} imported {got['distconv']}")
    return got


def commit_of(path):
    """The git commit checked out at ``path`` (None outside a git checkout)."""
    out = subprocess.run(["git", "-C", path, "rev-parse", "HEAD"], capture_output=True,
                         text=True)
    return out.stdout.strip() if out.returncode == 0 else None


def summarise(runs, codes, cases) -> list:
    """Per case and code: median search and plan_model seconds, the per-round ratio of
    search_s to the first code's (median, min, max), and whether every digest agreed."""
    rows = []
    for case in cases:
        mine = [r for r in runs if tuple(r["case"]) == case]
        base = {r["round"]: r["search_s"] for r in mine if r["code"] == codes[0][0]}
        for name, _ in codes:
            rs = [r for r in mine if r["code"] == name]
            ratios = [r["search_s"] / base[r["round"]] for r in rs]
            rows.append({"case": ":".join(map(str, case)), "code": name, "n": len(rs),
                         "search_s_median": statistics.median(r["search_s"] for r in rs),
                         "cpu_plan_model_s_median": statistics.median(
                             r["cpu_plan_model_s"] for r in rs),
                         "ratio_median": statistics.median(ratios),
                         "ratio_min": min(ratios), "ratio_max": max(ratios),
                         "digests": sorted({r["digest"] for r in rs})})
    return rows


def main(argv=None):
    a = parse_args(argv)
    runs = []
    total = a.rounds * len(a.case) * len(a.code)
    for rnd in range(1, a.rounds + 1):
        for case in a.case:
            for name, path in a.code:
                r = measure(path, case)
                r.update(code=name, case=list(case), round=rnd)
                runs.append(r)
                print(f"[{len(runs)}/{total}] round {rnd} {':'.join(map(str, case))} "
                      f"{name}: search {r['search_s']:.3f} s", flush=True)
    rows = summarise(runs, a.code, a.case)
    first = a.code[0][0]
    print(f"\n{'case':<22} {'code':<10} {'search s':>9} {'/ ' + first:>10} "
          f"{'range':>13}  digest")
    for r in rows:
        print(f"{r['case']:<22} {r['code']:<10} {r['search_s_median']:>9.3f} "
              f"{r['ratio_median']:>10.3f} {r['ratio_min']:>6.3f}-{r['ratio_max']:<6.3f} "
              f" {','.join(d[:8] for d in r['digests'])}")
    if a.json:
        from distconv.envinfo import write_results
        write_results(a.json, {"what": __doc__.split("\n")[0],
                               "codes": dict(a.code), "rounds": a.rounds,
                               "commits": {n: commit_of(p) for n, p in a.code},
                               "summary": rows, "runs": runs})


if __name__ == "__main__":
    main()
