"""Argument handling the benchmark scripts share: defaults that differ with ``--quick``,
and lower bounds checked the same way in every script."""
from __future__ import annotations

import argparse


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


def add_strategies(ap, default: str, of: str) -> None:
    """``--strategies``, the ``;``-separated Strategy texts ``of`` what (e.g. ``"of the
    P-rank cases"``), ``default`` for 2 ranks; :func:`split_list` reads them."""
    ap.add_argument("--strategies", default=default,
                    help=f"';'-separated Strategy texts {of} (default {default!r}, for 2 ranks)")


def split_list(ap, text: str, flag: str, required: bool = True) -> list:
    """The non-empty ``;``-separated items of ``text`` (``ap.error`` naming ``flag`` when
    there are none and ``required``)."""
    items = [s.strip() for s in text.split(";") if s.strip()]
    if required and not items:
        ap.error(f"{flag} names no strategy")
    return items


def positive_ints(ap, text, flag: str) -> list:
    """The comma-separated integers of ``text``, at least one and every one >= 1
    (``ap.error`` naming ``flag`` and ``text`` otherwise)."""
    msg = f"{flag} must be positive integers separated by commas, got {text!r}"
    try:
        items = [int(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        ap.error(msg)
    if not items or min(items) < 1:
        ap.error(msg)
    return items


def bench_parser(prog: str, doc: str) -> argparse.ArgumentParser:
    """A benchmark script's parser: the first paragraph of its docstring ``doc`` as the
    description, the rest as the epilog."""
    return argparse.ArgumentParser(prog=prog, description=doc.split("\n\n")[0],
                                   epilog=doc.split("\n\n", 1)[1],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)


def add_sized(ap, sizes, defaults, quick_defaults) -> None:
    """Integer options ``--<name>`` for ``sizes`` (``[(name, what)]``), their help naming
    the default and the ``--quick`` value, then ``--quick``, ``--json`` and ``--seed``."""
    for k, what in sizes:
        ap.add_argument(f"--{k.replace('_', '-')}", type=int, default=None,
                        help=f"{what} ({defaults[k]}; --quick: {quick_defaults[k]})")
    ap.add_argument("--quick", action="store_true", help="tiny shapes, 3 rounds (tests)")
    ap.add_argument("--json", default=None, help="rank 0 writes every step time here")
    ap.add_argument("--seed", type=int, default=0)


def parse_sized(ap, argv, defaults, quick_defaults, nonnegative=("warmup",)):
    """Parse ``argv``, fill the sizes' defaults and check them: every one >= 1 but those of
    ``nonnegative`` (>= 0)."""
    a = ap.parse_args(argv)
    fill_defaults(a, defaults, quick_defaults)
    require_positive(ap, a, [k for k in defaults if k not in nonnegative],
                     nonnegative=nonnegative)
    return a
