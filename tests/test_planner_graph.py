"""The planner's graph comes from the model's own recorded forward (shape-only).

Any Module whose graph is series-parallel (chains, and forks whose branches meet at one
add or cat) can be planned: a user-defined model with ``nn.Residual`` and a hand-written
``f(x) + x`` is traced into blocks and ``dc.planner.plan_model`` returns a plan that
applies with ``set_strategy`` (cat blocks: tests/test_planner_dag.py). Graphs the search
cannot reduce (a value used past its fork's join, a cat of one value twice, a module
called twice) get an error naming the node.
"""
import numpy as np
import pytest


def test_user_model_is_traced_into_blocks_and_planned():
    import distconv as dc
    from distconv.planner.graph import BlockSpec, trace
    from tests.test_planner_comm import _UserNet
    dc.set_default_dtype(np.float32)
    m = _UserNet()
    g = trace(m, (8, 3, 16, 16))
    blocks = [it for it in g.items if isinstance(it, BlockSpec)]
    assert [b.name for b in blocks] == ["res", "f"]
    res, f = blocks
    assert [s.name for s in res.body] == ["res.body.0", "res.body.1", "res.body.2"]
    assert [s.name for s in res.shortcut] == ["res.shortcut.0", "res.shortcut.1"]
    assert res.join is None and f.join is None and f.shortcut == []
    assert g.out_shape == (8, 6)
    out = dc.planner.plan_model(m, (8, 3, 16, 16), 4)
    plan = out["plan"]
    assert set(plan) == set(g.strategic_names())
    assert out["predicted"]["step_s"] > 0


def test_trace_leaves_the_model_unchanged():
    import distconv as dc
    from distconv import models
    from distconv.planner.graph import trace
    m = models.small_resnet()
    sd = m.state_dict()
    ids = [id(p.data) for p in m.parameters()]
    trace(m, (8, 1, 8, 8))
    assert [id(p.data) for p in m.parameters()] == ids
    assert all(np.array_equal(v, m.state_dict()[k]) for k, v in sd.items())
    del dc


def test_irreducible_graphs_and_shared_modules_are_named_errors():
    import distconv as dc
    from distconv import nn
    from distconv.planner.graph import GraphError, trace
    from tests.test_autograd import _dag_model

    with pytest.raises(GraphError, match=r"module 'shared' is called more than once"):
        trace(_dag_model(1), (2, 3, 6, 6))

    class Bridge(nn.Module):
        """Not series-parallel: ``a`` feeds both the add and the cat after it."""

        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 2, 1)
            self.b = nn.Conv2d(3, 2, 1)
            self.fc = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))

        def forward(self, x):
            a = self.a(x)
            return self.fc(dc.cat([a + self.b(x), a]))

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 2, 1)
            self.fc = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))

        def forward(self, x):
            a = self.a(x)
            return self.fc(dc.cat([a, a]))

    with pytest.raises(GraphError, match=r"cannot reduce the graph at 'a'"):
        trace(Bridge(), (2, 3, 4, 4))
    with pytest.raises(GraphError, match=r"cannot reduce the graph at 'a'"):
        dc.planner.plan_model(Bridge(), (2, 3, 4, 4), 2)
    with pytest.raises(GraphError, match=r"the 'cat' node .* only an add or a cat of "
                                         r"distinct branches"):
        trace(Twice(), (2, 3, 4, 4))


def test_model_whose_forward_fails_shape_only_names_the_layer():
    from distconv import nn
    from distconv.planner.graph import GraphError, trace

    class Odd(nn.Conv2d):
        def _forward(self, x, save):
            int(x.local.sum())
            return super()._forward(x, save)

    with pytest.raises(GraphError, match=r"could not trace the model: shape-only execution "
                                         r"failed in forward at '1'"):
        trace(nn.Sequential(nn.Conv2d(3, 3, 1), Odd(3, 3, 1)), (2, 3, 4, 4))
