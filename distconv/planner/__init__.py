"""Automatic per-layer strategy planner (OptCNN / FlexFlow style).

* :mod:`.graph`: the layer graph of a model (shapes, kinds, forks joined by add or cat),
  read from the autograd nodes of one shape-only forward of the model itself.
* :mod:`.compute`: seconds of the local kernels of a layer's shard, measured on
  this machine and cached, or from a fitted model.
* :mod:`.machine`: a machine description (ranks per node, link α–β per collective,
  compute scale) saved as JSON; calibrated on the current job or written by hand.
* :mod:`.commmodel`: bytes each rank sends and receives in a redistribution or a cat,
  from :mod:`distconv.tensor`'s own code run shape-only.
* :mod:`.events`: which redistributions and allreduces each layer kind issues under a
  strategy (a hand-written list, checked against ``comm.stats()``).
* :mod:`.costs`: per-layer time and memory of a strategy.
* :mod:`.search`: dynamic programming over series-parallel graphs (node and edge
  elimination).
* :mod:`.simulate`: step-time replay of a plan with overlapped gradient allreduces.
* :mod:`.mcmc`: FlexFlow's MCMC refinement of a plan by the simulated step time.
"""

from .auto import plan_model  # noqa: F401,E402
