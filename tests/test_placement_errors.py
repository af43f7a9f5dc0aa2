"""Operator placement: the text form of ``Strategy(ranks=...)`` and bad input, which
raises the same clear error on every rank instead of hanging (a rank outside the job, an
empty rank set, a strategy that does not fit its rank set, a plan that differs between
ranks)."""
from collections import OrderedDict

import pytest

from distconv import nn
from distconv.strategy import Strategy
from tests.mpi_harness import mpi


def test_strategy_ranks_text_and_plan_files():
    """``ranks=`` parses, prints and round-trips through to_dict (plan files)."""
    s = Strategy.parse("sample=2,ranks=0-1")
    assert s == Strategy(sample=2, ranks=(0, 1)) and str(s).endswith("ranks=0-1")
    assert Strategy(**s.to_dict()) == s and s.to_dict()["ranks"] == [0, 1]
    t = Strategy.parse("channel=2,ranks=4+0+6-7")
    assert t.ranks == (4, 0, 6, 7) and Strategy.parse(str(t)) == t
    assert "ranks" not in Strategy(sample=2).to_dict()
    assert Strategy(ranks=[3]).ranks == (3,)


@pytest.mark.parametrize("text,match", [
    ("sample=1,ranks=", "not a rank set"), ("ranks=3-1", "is empty"),
    ("ranks=0+0", "twice"), ("ranks=a", "not a rank set")])
def test_bad_rank_text(text, match):
    with pytest.raises(ValueError, match=match):
        Strategy.parse(text)


def test_empty_rank_set():
    with pytest.raises(ValueError, match="empty rank set"):
        Strategy(ranks=())


BAD = {"outside": ("sample=2,ranks=1-2", "outside the job"),
       "product": ("sample=2,channel=2,ranks=0-1", "its rank set 0-1 has 2"),
       "one rank's plan": (None, "ranks disagree on the plan")}


@pytest.mark.parametrize("case", sorted(BAD))
@mpi(ranks=(2, 3), timeout=60)
def test_bad_placement_raises_on_every_rank(comm, case):
    """Every rank raises the same ValueError (a hang would time out): a rank outside the
    job, a strategy whose product is not the rank set's size, and a plan that differs
    between ranks (its placements would leave a rank waiting), both at construction and
    in set_strategy."""
    text, match = BAD[case]
    size = comm.size
    if case == "outside":
        text = f"sample=2,ranks={size - 1}-{size}"
    if text is not None:
        with pytest.raises(ValueError, match=match):
            nn.Conv2d(3, 4, 3, strategy=text)
        with pytest.raises(ValueError, match=match):
            nn.Sequential(nn.Conv2d(3, 4, 3)).set_strategy({"0": text})
        return
    mine = f"sample=1,ranks={comm.rank}"
    with pytest.raises(ValueError, match="ranks disagree on a placed grid"):
        nn.Conv2d(3, 4, 3, strategy=mine)
    m = nn.Sequential(nn.Conv2d(3, 4, 3))
    with pytest.raises(ValueError, match=match):
        m.set_strategy({"0": mine})
    assert OrderedDict(m.state_dict())  # nothing moved: the model still works


def test_grid_ranks_must_be_distinct_ranks_of_the_communicator():
    from distconv.grid import ProcessGrid
    with pytest.raises(ValueError, match="must be distinct ranks"):
        ProcessGrid(None, (2,), ("sample",), ranks=(0, 0))
    with pytest.raises(ValueError, match="must be distinct ranks"):
        ProcessGrid(None, (1,), ("sample",), ranks=(3,))
    g = ProcessGrid(None, (1,), ("sample",), ranks=(0,))
    assert g.member and g.spans_world and g.position(0) == 0


def test_fork_of_a_global_array_gives_it_to_every_branch():
    """A model's own input (a global array, as layers accept it) is passed to every branch
    unchanged; anything else is refused, naming what came."""
    import numpy as np
    import distconv as dc
    x = np.zeros((2, 3, 4, 4))
    got = dc.fork(x, [nn.Conv2d(3, 4, 1), nn.Conv2d(3, 2, 1)])
    assert len(got) == 2 and all(g is x for g in got)
    with pytest.raises(TypeError, match="DistTensor or a global array, got list"):
        dc.fork([1, 2], [nn.Conv2d(3, 4, 1)])
    with pytest.raises(ValueError, match="non-empty"):
        dc.fork(x, [])
