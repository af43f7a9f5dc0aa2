#!/usr/bin/env python
"""A training loop of your own with distconv layers: mpiexec -n 2 python scripts/custom_loop.py

The model mixes strategies per layer: a data-parallel first conv, a channel-parallel
second conv and a filter-parallel classifier. Every rank runs the same loop;
``loss`` is the global mean on every rank.
"""
import sys

import numpy as np

import distconv as dc
from distconv import nn, optim
from distconv.comm import world


def main():
    p = world().size
    dc.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1, strategy=dc.Strategy()),                 # sample
        nn.BatchNorm2d(16, strategy=dc.Strategy()),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1, strategy=dc.Strategy(sample=1, channel=p)),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, 10, strategy=dc.Strategy(sample=1, filter=p)))
    opt = optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    crit = nn.CrossEntropyLoss()
    rng = np.random.default_rng(0)             # same stream on every rank
    x = rng.standard_normal((32, 3, 8, 8)).astype(np.float32)
    y = (x.mean(axis=(1, 2, 3)) > 0).astype(np.int64) + 2 * (x[:, 0].mean(axis=(1, 2)) > 0)
    for step in range(20):
        opt.zero_grad()
        logits = model(x)                      # x: the global batch; each rank keeps its block
        loss = crit(logits, y)                 # a float: the mean over the global batch
        loss.backward()                        # gradients, pending over replica groups
        opt.step()                             # segmented allreduce, then the update
        if world().rank == 0 and step % 5 == 4:
            print(f"step {step + 1}: loss {loss:.4f}", flush=True)
    return 0


if __name__ == "__main__":
    from distconv.comm import run_guarded  # a failing rank ends the whole job
    sys.exit(run_guarded(main))
