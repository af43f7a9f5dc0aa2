"""Numerically stable softmax-family helpers and local cross-entropy pieces.

Logits are (N, K) (classes on axis 1 by default); labels are int (N,).
The "local" cross-entropy functions return the *sum* over the local samples
so that a distributed loss can add sums over ranks and divide by the global
batch size itself.
"""
from __future__ import annotations

import numpy as np

from ..backend import array_module


def logsumexp(z, axis=1, keepdims=False):
    """log(sum(exp(z), axis)) computed stably (max-shifted); z's float dtype.

    An all -inf slice gives -inf; an empty axis gives -inf.
    """
    xp = array_module(z)
    if z.shape[axis] == 0:
        shape = list(z.shape)
        if keepdims:
            shape[axis] = 1
        else:
            del shape[axis]
        return xp.full(shape, -np.inf, z.dtype)
    m = z.max(axis=axis, keepdims=True)
    m = xp.where(xp.isfinite(m), m, xp.zeros_like(m))
    s = xp.exp(z - m).sum(axis=axis, keepdims=True)
    with np.errstate(divide="ignore"):
        out = xp.log(s) + m
    return out if keepdims else xp.squeeze(out, axis=axis)


def log_softmax(z, axis=1):
    """z - logsumexp(z): same shape and dtype as z."""
    return z - logsumexp(z, axis=axis, keepdims=True)


def softmax(z, axis=1):
    """exp(log_softmax(z)): same shape and dtype as z."""
    xp = array_module(z)
    return xp.exp(log_softmax(z, axis=axis))


def _check_labels(logits, labels):
    if logits.ndim != 2:
        raise ValueError(f"logits must be (N, K), got shape {tuple(logits.shape)}")
    if labels.shape != (logits.shape[0],):
        raise ValueError(f"labels must be ({logits.shape[0]},), got {tuple(labels.shape)}")


def cross_entropy_forward_local(logits, labels):
    """Sum over local samples of -log softmax(logits)[n, labels[n]].

    logits: (N, K); labels: int (N,) -> (loss_sum: float, probs: (N, K) softmax,
    for :func:`cross_entropy_backward_local`).
    """
    xp = array_module(logits)
    _check_labels(logits, labels)
    N = logits.shape[0]
    if N == 0:
        return 0.0, xp.zeros(logits.shape, logits.dtype)
    lsm = log_softmax(logits, axis=1)
    idx = xp.asarray(labels).astype(np.int64)
    picked = lsm[xp.arange(N), idx]
    loss = -float(picked.astype(np.float64).sum())
    return loss, xp.exp(lsm)


def cross_entropy_backward_local(probs, labels, scale=1.0):
    """d(loss_sum * scale)/dlogits = (probs - onehot(labels)) * scale; (N, K) of probs' dtype.

    For a mean over a global batch of size G pass ``scale = 1/G``.
    """
    xp = array_module(probs)
    _check_labels(probs, labels)
    g = probs.copy()
    N = probs.shape[0]
    if N:
        g[xp.arange(N), xp.asarray(labels).astype(np.int64)] -= 1
    g *= probs.dtype.type(scale)
    return g
