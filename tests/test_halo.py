"""distconv.halo window math against brute force (pure, no MPI).

For every (n, parts, kernel, stride, padding, dilation) of a grid that includes k=7 s=2 p=3,
dilation 2 and 3, asymmetric padding, n < parts (empty blocks) and kernels shorter than the
stride, :func:`problems` checks each block's window against the set of padded positions its
output rows read, computed here independently, and runs a 1-D correlation on the window
(padding 0) against the global one. Negative controls: mutated windows must be reported.
"""
import itertools

import numpy as np
import pytest

from distconv import halo

KERNELS = (1, 2, 3, 5, 7)
STRIDES = (1, 2, 3)
PADDINGS = (0, 1, 3, (0, 2), (2, 1))
DILATIONS = (1, 2, 3)


def ref_blocks(n, p):
    sizes = [n // p + (1 if i < n % p else 0) for i in range(p)]
    starts = [sum(sizes[:i]) for i in range(p)]
    return [(s, s + z) for s, z in zip(starts, sizes)]


def ref_out(n, k, s, p_lo, p_hi, d):
    return (n + p_lo + p_hi - d * (k - 1) - 1) // s + 1


def corr1d(x, wt, s, p_lo, p_hi, d, n_out):
    """Global 1-D correlation with zero padding, by definition."""
    xp = np.concatenate([np.zeros(p_lo), x, np.zeros(p_hi + len(wt) * d + s)])
    return np.array([sum(wt[j] * xp[o * s + j * d] for j in range(len(wt)))
                     for o in range(n_out)])


def problems(n, parts, k, s, pad, d, wins, values=True):
    """Mismatches of ``wins`` against brute force, as strings (empty: all right)."""
    p_lo, p_hi = (pad, pad) if isinstance(pad, int) else pad
    n_out = ref_out(n, k, s, p_lo, p_hi, d)
    blocks, oblocks = ref_blocks(n, parts), ref_blocks(n_out, parts)
    out = []
    if len(wins) != parts:
        return [f"{len(wins)} windows for {parts} blocks"]
    rng = np.random.default_rng(n * 1000 + parts)
    x = rng.integers(-5, 6, n).astype(float)
    wt = rng.integers(-3, 4, k).astype(float)
    y = corr1d(x, wt, s, p_lo, p_hi, d, n_out)
    for i, w in enumerate(wins):
        tag = f"n={n} P={parts} k={k} s={s} p={pad} d={d} block {i}"
        if w.block != i or w.owned != blocks[i] or w.out != oblocks[i]:
            out.append(f"{tag}: block/owned/out {w.block} {w.owned} {w.out}")
            continue
        o0, o1 = oblocks[i]
        read = sorted({o * s - p_lo + j * d for o in range(o0, o1) for j in range(k)})
        if not read:
            if w.size or w.pieces:
                out.append(f"{tag}: empty output block but window {w}")
            continue
        lo, hi = read[0], read[-1] + 1
        if (w.start, w.start + w.size) != (lo, hi):
            out.append(f"{tag}: span {(w.start, w.start + w.size)} != {(lo, hi)}")
        inside = [r for r in range(lo, hi) if 0 <= r < n]
        if list(range(*w.rows)) != inside:
            out.append(f"{tag}: rows {w.rows} != {inside[:1]}..{inside[-1:]}")
        if w.pad != (sum(r < 0 for r in range(lo, hi)), sum(r >= n for r in range(lo, hi))):
            out.append(f"{tag}: pad {w.pad}")
        readin = [r for r in read if 0 <= r < n]
        prev = w.rows[0]
        for q, a, b in w.pieces:
            if not (b > a and a >= prev and blocks[q][0] <= a and b <= blocks[q][1]):
                out.append(f"{tag}: piece {(q, a, b)} not ascending inside rows {w.rows} and "
                           f"owner block {blocks[q]}")
            prev = b
            mine = [r for r in readin if blocks[q][0] <= r < blocks[q][1]]
            if not mine or (a, b) != (mine[0], mine[-1] + 1):
                out.append(f"{tag}: piece {(q, a, b)} is not the hull of the rows read there")
        if w.pieces and w.pieces[-1][2] > w.rows[1]:
            out.append(f"{tag}: pieces {w.pieces} reach past rows {w.rows}")
        got = {r for _, a, b in w.pieces for r in range(a, b)}
        if not set(readin) <= got:
            out.append(f"{tag}: pieces {w.pieces} miss read rows {sorted(set(readin) - got)}")
        if len({q for q, _, _ in w.pieces}) != len(w.pieces):
            out.append(f"{tag}: an owner appears twice in {w.pieces}")
        if values:
            # rows outside every piece are NaN: a read of one shows in the result
            body = np.full(max(0, w.rows[1] - w.rows[0]), np.nan)
            for _, a, b in w.pieces:
                body[a - w.rows[0]:b - w.rows[0]] = x[a:b]
            win = np.concatenate([np.zeros(w.pad[0]), body, np.zeros(w.pad[1])])
            if len(win) != w.size:
                out.append(f"{tag}: window length {len(win)} != size {w.size}")
                continue
            yl = corr1d(win, wt, s, 0, 0, d, o1 - o0)
            if (w.size - d * (k - 1) - 1) // s + 1 != o1 - o0 or not np.array_equal(yl, y[o0:o1]):
                out.append(f"{tag}: local correlation on the window differs from the global one")
    return out


def all_cases():
    for n, parts, k, s, pad, d in itertools.product(range(1, 14), range(1, 6), KERNELS,
                                                    STRIDES, PADDINGS, DILATIONS):
        p_lo, p_hi = (pad, pad) if isinstance(pad, int) else pad
        if ref_out(n, k, s, p_lo, p_hi, d) >= 1:
            yield n, parts, k, s, pad, d


def test_windows_match_brute_force():
    bad, count = [], 0
    for n, parts, k, s, pad, d in all_cases():
        wins = halo.windows(n, parts, k, s, pad, d)
        # values only on a subset: the set checks are exhaustive, the local runs sample
        bad += problems(n, parts, k, s, pad, d, wins, values=(n + parts + k) % 4 == 0)
        count += 1
    assert count > 5000
    assert not bad, f"{len(bad)} problems, first: " + "\n".join(bad[:10])


@pytest.mark.parametrize("n, parts, k, s, pad, d", [
    (11, 4, 7, 2, 3, 1),      # ResNet stem geometry on small blocks
    (7, 4, 7, 1, 3, 1),       # pieces from blocks two and three away
    (9, 3, 3, 1, 2, 2),       # dilation 2, 'same'
    (3, 5, 3, 1, 1, 1),       # n < parts: empty blocks
    (8, 2, 1, 2, 0, 1),       # kernel shorter than the stride
    (7, 4, 3, 1, 2, 2),       # dilation 2 on 2-row blocks: an unread row is not sent
])
def test_named_cases_with_values(n, parts, k, s, pad, d):
    wins = halo.windows(n, parts, k, s, pad, d)
    assert problems(n, parts, k, s, pad, d, wins) == []


def test_multi_owner_and_empty_blocks():
    wins = halo.windows(7, 4, 7, 1, 3)
    assert [q for q, _, _ in wins[1].pieces] == [0, 1, 2, 3]      # beyond the neighbours
    assert wins[1].halo == (2, 3)
    w = halo.windows(3, 5, 3, 1, 1)
    assert [x.size for x in w] == [3, 3, 3, 0, 0] and w[4].pieces == ()
    # dilation 2: block 3 reads rows 4 and 6 only, so block 2 sends row 4 alone
    assert halo.windows(7, 4, 3, 1, 2, 2)[3].pieces == ((2, 4, 5), (3, 6, 7))
    # an owner whose rows all fall in a gap sends nothing: taps 5 apart read rows 0, 1, 5, 6
    w = halo.windows(12, 6, 2, 1, 0, 5)[0]
    assert w.rows == (0, 7) and [q for q, _, _ in w.pieces] == [0, 2, 3]
    # sends are the transpose of the pieces
    wins = halo.windows(11, 4, 7, 2, 3)
    for q in range(4):
        for dest, a, b in halo.sends(wins, q):
            assert (q, a, b) in wins[dest].pieces


def test_negative_controls():
    """Each kind of wrong window is reported by the brute-force check."""
    from dataclasses import replace

    n, parts, k, s, pad, d = 11, 4, 7, 2, 3, 1
    good = list(halo.windows(n, parts, k, s, pad, d))
    w, w0 = good[1], good[0]
    q, a, b = w.pieces[0]
    mutants = {
        "halo one row short": (1, replace(w, rows=(a + 1, w.rows[1]),
                                          pieces=((q, a + 1, b),) + w.pieces[1:])),
        "piece dropped (zeros instead)": (1, replace(w, pad=(w.pad[0] + b - a, w.pad[1]),
                                                     pieces=w.pieces[1:])),
        "wrong owner": (1, replace(w, pieces=((q + 1, a, b),) + w.pieces[1:])),
        "padding on the wrong side": (0, replace(w0, pad=w0.pad[::-1])),
        "window shifted by one": (0, replace(w0, pad=(w0.pad[0] - 1, w0.pad[1] + 1))),
        "output block of a neighbour": (2, replace(good[2], out=good[1].out)),
    }
    for name, (i, m) in mutants.items():
        wins = good[:i] + [m] + good[i + 1:]
        assert problems(n, parts, k, s, pad, d, wins), name


@pytest.mark.parametrize("args, match", [
    ((5, 0, 3), "parts must be an int >= 1"),
    ((5, 2, 0), "kernel must be an int >= 1"),
    ((5, 2, 3, 0), "stride must be an int >= 1"),
    ((5, 2, 3, 1, -1), "padding must be an int >= 0"),
    ((5, 2, 3, 1, (1, 2, 3)), "padding must be an int or a pair"),
    ((5, 2, 3, 1, 0, 0), "dilation must be an int >= 1"),
    ((2, 2, 5, 1, 0, 1), "output would be empty"),
])
def test_bad_arguments(args, match):
    with pytest.raises(ValueError, match=match):
        halo.windows(*args)
