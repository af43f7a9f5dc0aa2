"""Argument handling the benchmark scripts share: defaults that differ with ``--quick``,
and lower bounds checked the same way in every script."""
from __future__ import annotations


def fill_defaults(args, defaults, quick_defaults):
    """Every argument of ``defaults`` left ``None`` takes its default there, or its value
    in ``quick_defaults`` when ``args.quick`` is set (in place)."""
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, quick_defaults[k] if args.quick else v)


def require_positive(ap, args, names):
    """``ap.error`` (exit status 2) for the first argument of ``names`` below 1."""
    for k in names:
        if getattr(args, k) < 1:
            ap.error(f"--{k.replace('_', '-')} must be >= 1")
