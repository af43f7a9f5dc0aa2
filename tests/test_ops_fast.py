"""The fast paths of the local kernels: caches and bookkeeping shortcuts behave like the
code they replace (each test fails if its shortcut returns stale or shared state)."""
import numpy as np

from distconv.ops import _workspace
from distconv.ops import batchnorm as B
from distconv.ops import conv as C


def test_workspace_key_spellings_share_one_buffer():
    _workspace.clear()
    # a tag's scratch buffer (not zeroed) is one flat buffer, handed out as views
    a = _workspace.get(np, "t", (3, 4), np.dtype(np.float32))
    for b in (_workspace.get(np, "t", [3, np.int64(4)], np.float32),
              _workspace.get(np, "t", (3, 4), "float32"),
              _workspace.get(np, "t", (4, 3), np.float32)):
        assert np.shares_memory(a, b) and b.dtype == np.float32
    assert _workspace.get(np, "t", [3, np.int64(4)], np.float32).shape == (3, 4)
    assert not np.shares_memory(a, _workspace.get(np, "t", (3, 4), np.float64))
    assert not np.shares_memory(a, _workspace.get(np, "u", (3, 4), np.float32))
    # zeroed buffers: one per exact shape, found under every spelling of it
    z = _workspace.get(np, "z", (5,), np.float64, zero=True)
    assert z.dtype == np.float64 and not z.any()
    assert _workspace.get(np, "z", [np.int64(5)], "float64", zero=True) is z
    assert _workspace.get(np, "z", (6,), np.float64, zero=True) is not z
    _workspace.clear()


def test_geometry_cache_follows_layout_constants(monkeypatch):
    args = ((2, 3, 30, 30), (4, 3, 3, 3), (1, 1), (1, 1), (1, 1))
    monkeypatch.setattr(C, "_EXT_MAX_WASTE", 1e9)
    assert C._geom(*args).ext
    monkeypatch.setattr(C, "_EXT_MAX_WASTE", -1.0)
    assert not C._geom(*args).ext
    monkeypatch.setattr(C, "_TARGET_COLS", 1)
    assert C._geom(*args).B == 1
    g = C._geom(*args)
    assert C._geom(*args) is g  # cached
    assert C._geom([2, 3, 30, 30], [4, 3, 3, 3], [1, 1], [1, 1], [1, 1]).B == 1  # lists


def test_row_factor_matches_tile():
    v = np.random.default_rng(0).standard_normal(5)
    for n in (1, 3):
        r = B._row_factor(np, v, np.float32, n)
        assert r.shape == (5 * n, 1) and r.dtype == np.float32
        np.testing.assert_array_equal(r.ravel(), np.tile(v.astype(np.float32), n))


def test_replace_pending_is_memoised_and_exact():
    from types import SimpleNamespace

    from distconv.distribution import Distribution
    g = SimpleNamespace(names=("sample", "channel", "filter"), shape=(2, 2, 2), comm=None)
    d = Distribution(g, [("sample",), ("channel",), None, None])
    assert d.replace(pending=()) is d  # nothing pending already
    p = Distribution(g, [("sample",), ("channel",)], pending=("filter",))
    out = p.replace(pending=())
    assert out == Distribution(g, [("sample",), ("channel",)]) and out.pending == ()
    assert p.replace(pending=()) is out  # memoised
    q = Distribution(g, [("sample",), ("channel",)], pending=("filter",))  # equal, not p
    assert q.replace(pending=()) == out and q.replace(pending=()) is not out
    f = d.replace(pending=("filter",))
    assert f == Distribution(g, [("sample",), ("channel",), None, None],
                             pending=("filter",)) and f.pending == ("filter",)
    assert d.replace(pending=["filter"]) is f
    # a change of split is never memoised, and a subclass gets a plain Distribution
    assert d.replace(split=[("sample",), None, None, None]).split[1] == ()
