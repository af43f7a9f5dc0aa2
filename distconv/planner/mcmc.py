"""MCMC refinement of a plan by the simulated step time, as FlexFlow's ``mcmc_optimize``.

FlexFlow (Jia et al., "Beyond Data and Model Parallelism for Deep Neural Networks",
SysML19; ``FFModel::mcmc_optimize`` in ``src/runtime/model.cc``) searches by
Metropolis–Hastings: from the current plan, propose a change (one operator's parallel
configuration to a random other one, or a propagation, below), simulate the step,
accept if it is faster, else accept with probability ``exp(-beta * delta_t)``; keep
the best plan seen, and every ``restart_every`` proposals put the chain back on the
best plan found so far.

Here the objective is :func:`.simulate.simulate`'s ``step_s`` (gradient allreduces
overlapped with backward), which the DP (:mod:`.search`) cannot minimise exactly: the DP
minimises an additive cost. :func:`mcmc` starts from a plan (``plan_model`` gives it the
fastest searched or uniform candidate) and returns a plan that is never slower than
that start under the simulator.

A *move* changes layers' *configurations*: a configuration is a strategy from
``cost.strategies`` or, with operator placement, a strategy on a subset of the ranks
(:class:`.strategies.Placed`); the candidate configurations per layer are the
``choices`` mapping. Two kinds of move, as FlexFlow's ``FFModel::rewrite``, and a third
for placement:

* (3/4 of proposals) one strategic layer, drawn uniformly, gets another of its
  configurations, drawn uniformly (the move of the SysML19 paper);
* (``propagate`` = 1/4, FlexFlow's ``PROPAGATION_CHANCE``) a layer's current
  configuration is copied to its neighbour in execution order (the next or the
  previous strategic layer), and on to the one after with probability 3/4
  (``CONTINUE_PROPAGATION_CHANCE``). Without it the chain rarely leaves the DP's plan:
  two plans that differ in adjacent layers (a conv and its batch norm, or two convs
  that share an activation layout) are often separated by single-layer changes that
  add a redistribution each and cost tens of % (``tests/test_planner_mcmc.py`` has
  one, on 4 ranks, where every single change from the DP's plan is ~30 % slower).
* (``GROUP_MOVE`` = 1/10 of proposals, only when ``group_moves`` are given) a group
  move: one fork's branches all at once, each branch's layers set to one configuration
  drawn from its list (:func:`.placement.placement_moves`: the branches on disjoint
  halves and quarters of the ranks, or the whole block back on all ranks). Placing
  towers one layer at a time passes through plans where a tower straddles two rank
  sets and the towers run one after another, each such step slower.

**beta.** ``delta_t`` is in seconds, so a fixed ``beta`` would mean something different
for a 2 ms step and a 2 s one. By default ``beta = BETA_SCALE / start_step`` with
:data:`BETA_SCALE` = 100: a proposal 1 % slower than the current plan (1 % of the
*start* plan's step) is accepted with probability ``exp(-1)`` ≈ 0.37, one 5 % slower
with ``exp(-5)`` ≈ 0.007: the chain wanders among plans within a few % of the current
one and returns to the best every ``restart_every`` proposals. Barriers of tens of %
(a single-layer change that adds a redistribution) are crossed by the propagation moves,
not by the temperature. The scale is a choice, not a tuned optimum: on ResNet-18/50 at
16-256 ranks (v100_ib, 3000 proposals) scales inf, 100 and 30 found nothing faster
than the DP's plan alike, and on the 4-rank fixture of the tests where the DP's plan is
not the optimum, scales 10, 30 and 100 all reached it within 400 proposals (3 seeds
each). ``beta=float("inf")`` accepts only proposals that
are not slower (a greedy hill-climb).

**Budget and determinism.** The chain is a deterministic function of ``seed`` (its own
``random.Random``; the layers and configurations are drawn in a fixed order): the first
``n`` proposals are the same for a seed on any machine. It stops at ``budget_s``
seconds of wall time or after ``max_proposals`` proposals, whichever comes first, so a
time budget alone gives a machine-dependent number of proposals; give
``max_proposals`` (and ``budget_s=float("inf")``) for a reproducible result.
"""
from __future__ import annotations

import math
import random
import time

from .simulate import simulate

#: default ``beta = BETA_SCALE / start step seconds`` (see the module docstring)
BETA_SCALE = 100.0

#: default restart span: FlexFlow restarts from the best plan every ``budget / 100``
#: proposals, clamped to [1, 1000]; with a budget in seconds the number of proposals is
#: not known ahead, so the span here is a fixed number of proposals per run
RESTART_EVERY = 500


#: share of proposals that are FlexFlow's propagation moves (``FFModel::rewrite`` with
#: ``use_propagation``: copy a layer's configuration to its neighbours), and the chance
#: that a propagation goes on to the next layer (FlexFlow's PROPAGATION_CHANCE = 0.25 and
#: CONTINUE_PROPAGATION_CHANCE = 0.75)
PROPAGATE = 0.25
CONTINUE_PROPAGATION = 0.75

#: share of proposals that are group moves (placing a fork's branches), when given
GROUP_MOVE = 0.1


def default_choices(cost) -> dict:
    """``{layer name: [configuration, ...]}``: every strategy of ``cost`` for every
    strategic layer, in the graph's order."""
    return {n: list(cost.strategies) for n in cost.graph.strategic_names()}


def mcmc(cost, start_plan, budget_s, beta=None, seed=0, memory_limit=None,
         max_proposals=None, restart_every=RESTART_EVERY, propagate=PROPAGATE, overlap=True,
         choices=None, objective=None, group_moves=None) -> dict:
    """Refine ``start_plan`` by Metropolis–Hastings on the simulated step time.

    ``cost``: a :class:`.costs.CostModel`; ``start_plan``: ``{layer name: (s, c, f)}``
    (e.g. ``search.search(cost)["plan"]``); ``budget_s``: wall seconds (0: no proposal);
    ``beta``: 1/seconds (default ``BETA_SCALE / start step``; ``inf``: only moves that
    are not slower are accepted); ``seed``: the chain's random seed; ``memory_limit``:
    bytes per rank, a proposal over it is rejected (``None``: no limit); the start plan
    must fit. ``max_proposals``: stop after that many proposals too (``None``: only the
    budget); ``restart_every``: proposals between restarts from the best plan (``None``
    or 0: never); ``overlap``: passed to :func:`.simulate.simulate`; ``choices``:
    ``{layer: [configuration, ...]}`` (default :func:`default_choices`); ``objective``:
    ``plan -> (step seconds, memory bytes)`` (default the simulator's; tests only);
    ``group_moves``: ``[[alternative, ...], ...]``, each alternative ``[(layer names,
    [configuration, ...]), ...]`` (see the module docstring; default none).

    Returns ``{"plan": best plan, "step_s": its simulated step, "start_step_s",
    "gain": start / best step, "memory": best plan's bytes per rank, "proposals",
    "accepted" (moves taken, better or not), "improved" (new best plans),
    "rejected_memory" (proposals over the limit), "restarts", "best_at" (proposal
    number of the last new best, 0: the start), "seconds", "beta", "seed"}``.
    """
    if objective is None:
        def objective(plan):
            sm = simulate(cost, plan, overlap=overlap)
            return sm["step_s"], sm["memory"]
    if choices is None:
        choices = default_choices(cost)
    names = [n for n in choices if len(choices[n]) > 1]
    where = {n: {c: i for i, c in enumerate(choices[n])} for n in names}
    missing = [n for n in choices if n not in start_plan]
    if missing:
        raise ValueError(f"the start plan has no configuration for layers {missing}")
    t0, rng = time.perf_counter(), random.Random(seed)
    cur = {n: (tuple(v) if isinstance(v, list) else v) for n, v in start_plan.items()}
    cur_t, cur_m = objective(cur)
    if memory_limit is not None and cur_m > memory_limit:
        raise ValueError(f"the start plan needs {int(cur_m)} bytes per rank, over the "
                         f"memory limit of {int(memory_limit)}")
    start_t = cur_t
    if beta is None:
        beta = BETA_SCALE / start_t if start_t > 0 else math.inf
    beta = float(beta)
    if beta < 0 or math.isnan(beta):
        raise ValueError(f"beta must be >= 0, got {beta}")
    best, best_t, best_m = dict(cur), cur_t, cur_m
    props = acc = improved = over = restarts = best_at = 0
    since = 0
    limit = math.inf if max_proposals is None else int(max_proposals)
    budget = float(budget_s)
    while names and props < limit and time.perf_counter() - t0 < budget:
        if restart_every and since >= restart_every:
            cur, cur_t = dict(best), best_t
            since = 0
            restarts += 1
        nxt = _propose(rng, cur, names, where, choices, propagate, group_moves)
        props += 1
        since += 1
        if nxt is None:  # a propagation that changed nothing: counted, never simulated
            continue
        u = rng.random()
        t, m = objective(nxt)
        if memory_limit is not None and m > memory_limit:
            over += 1
            continue
        delta = t - cur_t
        if delta <= 0 or (beta < math.inf and u < math.exp(-beta * delta)):
            cur, cur_t = nxt, t
            acc += 1
            if t < best_t:
                best, best_t, best_m = dict(nxt), t, m
                improved += 1
                best_at = props
    return {"plan": best, "step_s": best_t, "start_step_s": start_t,
            "gain": start_t / best_t if best_t > 0 else 1.0, "memory": best_m,
            "proposals": props, "accepted": acc, "improved": improved,
            "rejected_memory": over, "restarts": restarts, "best_at": best_at,
            "seconds": time.perf_counter() - t0, "beta": beta, "seed": seed}


def _propose(rng, cur, names, where, choices, propagate, group_moves=None):
    """The next plan proposed from ``cur`` (None: a move that changed nothing)."""
    if group_moves and rng.random() < GROUP_MOVE:
        return _group_move(rng, cur, group_moves)
    nxt = dict(cur)
    if rng.random() < propagate:
        # FlexFlow's propagation move: copy one layer's configuration to its neighbour
        # in execution order, and on with CONTINUE_PROPAGATION each step
        i = rng.randrange(len(names))
        step = 1 if rng.random() < 0.5 else -1
        conf = cur[names[i]]
        while True:
            i += step
            if not 0 <= i < len(names) or conf not in where[names[i]]:
                break
            nxt[names[i]] = conf
            if rng.random() >= CONTINUE_PROPAGATION:
                break
        return None if nxt == cur else nxt
    # the move: one layer, one other configuration of it (both uniform)
    name = names[rng.randrange(len(names))]
    opts = choices[name]
    i_old = where[name].get(cur[name], -1)
    if i_old < 0:  # a start configuration not among the choices: any listed one
        k = rng.randrange(len(opts))
    else:  # any other one
        k = rng.randrange(len(opts) - 1)
        k += k >= i_old
    nxt[name] = opts[k]
    return nxt


def _group_move(rng, cur, group_moves):
    """One alternative of one group applied to ``cur`` (None if it changes nothing)."""
    group = group_moves[rng.randrange(len(group_moves))]
    nxt = dict(cur)
    for layers, confs in group[rng.randrange(len(group))]:
        conf = confs[rng.randrange(len(confs))]
        for n in layers:
            nxt[n] = conf
    return None if nxt == cur else nxt

