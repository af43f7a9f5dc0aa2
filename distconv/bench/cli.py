"""Argument handling the benchmark scripts share: defaults that differ with ``--quick``,
lower bounds checked the same way in every script, and argparse ``type`` converters
for byte counts, image shapes and bounded integers (``plan.py``'s)."""
from __future__ import annotations

import argparse
import re


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


_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(text: str):
    """``"16GiB"``, ``"512MiB"``, ``"16GB"``, ``"1e9"``, ``"17179869184"`` -> bytes (int);
    ``"none"`` -> ``None`` (no limit). ``ValueError`` naming the accepted forms."""
    t = str(text).strip()
    if t.lower() in ("none", "unlimited"):
        return None
    m = re.fullmatch(r"([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)", t)
    unit = m.group(2).lower() if m else None
    if m is None or unit not in _UNITS:
        raise ValueError(f"expected a byte count such as 17179869184, 16GiB, 512MiB, 16GB "
                         f"or 'none' (units: B, KB, MB, GB, TB, KiB, MiB, GiB, TiB), "
                         f"got {text!r}")
    n = float(m.group(1)) * _UNITS[unit]
    if not n >= 1:
        raise ValueError(f"expected a memory limit of at least 1 byte, got {text!r}")
    return int(n)


def bytes_arg(text):
    """An argparse ``type``: :func:`parse_bytes`."""
    try:
        return parse_bytes(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def parse_shape(text: str) -> tuple:
    """``"3,224,224"`` -> ``(3, 224, 224)``; ``ValueError`` unless three integers >= 1."""
    parts = [p.strip() for p in str(text).replace("x", ",").split(",")]
    try:
        vals = tuple(int(p) for p in parts)
    except ValueError:
        vals = ()
    if len(vals) != 3 or min(vals) < 1:
        raise ValueError(f"expected C,H,W: three integers >= 1 such as 3,224,224, got {text!r}")
    return vals


def shape_arg(text):
    """An argparse ``type``: :func:`parse_shape`."""
    try:
        return parse_shape(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def int_at_least(what, low=1):
    """An argparse ``type``: an integer >= ``low`` (``what`` it counts, for the message)."""
    def conv(text):
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low} ({what}), "
                                             f"got {text!r}") from None
        if v < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low} ({what}), got {v}")
        return v
    return conv


def add_bucket_kb(ap) -> None:
    """``--bucket-kb`` of the planner scripts: the GradientSync bucket size (KiB, >= 0) the
    predicted step reduces gradients in; :func:`bucket_bytes` turns it into the planner's
    ``bucket_bytes``."""
    from ..optim import BUCKET_BYTES
    ap.add_argument("--bucket-kb", type=int_at_least("KiB", 0), default=BUCKET_BYTES >> 10,
                    help=f"GradientSync bucket size of the predicted step, KiB (train.py "
                         f"--bucket-kb; default {BUCKET_BYTES >> 10}); 0: one allreduce per "
                         f"parameter (sync_gradients)")


def bucket_bytes(args):
    """The planner's ``bucket_bytes`` of ``--bucket-kb`` (``None`` for 0)."""
    return (args.bucket_kb << 10) or None
