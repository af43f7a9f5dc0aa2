"""Argument handling the benchmark scripts share: defaults that differ with ``--quick``,
and lower bounds checked the same way in every script."""
from __future__ import annotations


def fill_defaults(args, defaults, quick_defaults):
    """Every argument of ``defaults`` left ``None`` takes its default there, or its value
    in ``quick_defaults`` when ``args.quick`` is set (in place)."""
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, quick_defaults[k] if args.quick else v)


def require_positive(ap, args, names, nonnegative=()):
    """``ap.error`` (exit status 2) for the first argument of ``names`` below 1 or of
    ``nonnegative`` below 0."""
    for k, low in [(k, 1) for k in names] + [(k, 0) for k in nonnegative]:
        v = getattr(args, k)
        if v < low:
            ap.error(f"--{k.replace('_', '-')} must be >= {low}, got {v}")


def split_list(ap, text: str, flag: str, required: bool = True) -> list:
    """The non-empty ``;``-separated items of ``text`` (``ap.error`` naming ``flag`` when
    there are none and ``required``)."""
    items = [s.strip() for s in text.split(";") if s.strip()]
    if required and not items:
        ap.error(f"{flag} names no strategy")
    return items
