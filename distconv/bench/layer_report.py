"""The printed tables and the cProfile pass of ``scripts/bench_layers.py``."""
from __future__ import annotations

from .layer_bench import strategy_label

MB = 1e6


def fmt_ms(t):
    return "-" if t is None else f"{t * 1e3:.1f}"


def fmt_x(v):
    return "-" if v is None else f"{v:.2f}x"


def print_table(result):
    sh = result["shape"]
    env = result["environment"]
    p = env["ranks"]
    base = result.get("baseline")
    print()
    print(f"Conv2d {sh['channels']}->{sh['filters']} {sh['kernel']}x{sh['kernel']} on "
          f"{sh['batch']}x{sh['channels']}x{sh['size']}x{sh['size']} {sh['dtype']}; "
          f"{p} rank(s) x {env['threads_per_rank']} BLAS thread; step = forward + backward "
          f"+ sync_gradients, time = max over ranks")
    if base and base.get("step_s"):
        print(f"1-rank baseline: {fmt_ms(base['step_s'])} ms median, "
              f"{fmt_ms(base.get('step_s_clean'))} ms clean "
              f"({base.get('clean_repeats', '?')}/{base.get('repeats', '?')} clean reps; "
              f"fwd {fmt_ms(base.get('fwd_s'))}, bwd {fmt_ms(base.get('bwd_s'))} ms) "
              f"[{base['source']}]")
    hdr = (f"{'strategy':<20}{'step ms':>9}{'speedup':>9}{'paired':>8}{'clean ms':>10}"
           f"{'clean sp':>10}{'clean/n':>9}{'fwd ms':>8}{'bwd ms':>8}{'sync ms':>8}"
           f"{'comp ms':>8}{'comm ms':>8}")
    print(hdr)
    print("-" * len(hdr))
    for r in result["strategies"]:
        print(f"{r['strategy']:<20}{fmt_ms(r['step_s']):>9}{fmt_x(r.get('speedup')):>9}"
              f"{fmt_x(r.get('speedup_paired')):>8}"
              f"{fmt_ms(r['step_s_clean']):>10}{fmt_x(r.get('speedup_clean')):>10}"
              f"{str(r['clean_repeats']) + '/' + str(r['repeats']):>9}"
              f"{fmt_ms(r['fwd_s']):>8}{fmt_ms(r['bwd_s']):>8}{fmt_ms(r['sync_s']):>8}"
              f"{fmt_ms(r['compute_s_mean']):>8}{fmt_ms(r['comm_s_mean']):>8}")
    print(f"step: median over repetitions; speedup = 1-rank median / step (ideal {p}.00x); "
          f"paired: median over rounds of 1-rank step / step of the same round; clean: "
          f"medians over the repetitions in which no rank lost over {result['clean_frac']:.0%} "
          f"of the step to other processes. fwd/bwd/sync: phase medians (max over ranks); "
          f"comp/comm: mean over ranks of step minus Communicator.stats() time, and that time "
          f"(includes waiting in collectives).")
    print()
    hdr = (f"{'strategy':<20}{'act MB':>9}{'grad MB':>9}{'total MB':>10}{'dp grad MB':>12}"
           f"{'grad/dp':>9}  collectives per step (calls x kind: MB sent)")
    print(hdr)
    print("-" * len(hdr))
    for r in result["strategies"]:
        dp = r["dp_grad_bytes_sent"]
        colls = []
        for part in ("act", "grad"):
            kinds = max(r["per_rank"], key=lambda x: x["act_bytes_sent"] + x["grad_bytes_sent"]) \
                ["collectives_per_step"][part]
            for k, v in kinds.items():
                colls.append(f"{v['calls']:g}x {k}{' (sync)' if part == 'grad' else ''}: "
                             f"{v['bytes_sent'] / MB:.2f}")
        print(f"{r['strategy']:<20}{r['act_bytes_sent'] / MB:9.2f}{r['grad_bytes_sent'] / MB:9.2f}"
              f"{(r['act_bytes_sent'] + r['grad_bytes_sent']) / MB:10.2f}{dp / MB:12.2f}"
              f"{(r['grad_bytes_sent'] / dp if dp else 0):9.2f}  {'; '.join(colls)}")
    print("MB: 1e6 bytes one rank sends per step (max over ranks): act = forward+backward "
          "collectives, grad = sync_gradients; dp grad = the gradient allreduce of data "
          "parallelism (all |w|) on the same ranks; grad/dp = grad MB / dp grad MB.")
    la, lb = env["loadavg_start"][0], env["loadavg_end"][0]
    print(f"load average (1 min) {la:.2f} at start, {lb:.2f} at end, {env['cpus_online']} CPUs"
          + ("  -- other processes were running: prefer the clean columns"
             if max(la, lb) > p + 0.5 else ""))


def profile_cases(cases, comm, top):
    import cProfile
    import io
    import pstats
    for case in cases:
        prof = cProfile.Profile() if comm.rank == 0 else None
        if prof:
            prof.enable()
        for _ in range(3):
            case.step(comm, record=False)
        if prof:
            prof.disable()
            s = io.StringIO()
            pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(top)
            print(f"\n=== cProfile rank 0, 3 steps of {strategy_label(case.strategy, comm.size)} "
                  f"(sorted by own time) ===")
            print(s.getvalue())
