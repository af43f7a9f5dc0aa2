#!/usr/bin/env python
"""Write HDF5 datasets for distconv (``images`` N×C×H×W, ``labels`` N).

Examples::

    python scripts/make_dataset.py digits --out data/
        # scikit-learn's 1,797 real 8x8 handwritten digits, float32 in [0, 1],
        # stratified 1,437/360 split: data/digits_train.h5, data/digits_test.h5
    python scripts/make_dataset.py synthetic --shape 1024,3,224,224 --classes 1000 \\
        --out imagenet_like.h5
        # random images and labels, written block by block (never whole in memory)

Files are written atomically (temp file + rename). The same functions are
``distconv.data.make_digits`` and ``distconv.data.make_synthetic``.
"""
from __future__ import annotations

import argparse
import sys


def _shape(text: str):
    try:
        parts = tuple(int(p) for p in text.replace("x", ",").split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N,C,H,W integers, got {text!r}") from None
    if len(parts) != 4 or any(p < 1 for p in parts):
        raise argparse.ArgumentTypeError(f"expected 4 positive integers N,C,H,W, got {text!r}")
    return parts


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="make_dataset.py",
        description="Write HDF5 datasets (images N×C×H×W, labels N) for distconv training.",
        epilog="Examples: 'make_dataset.py digits --out data/'; "
               "'make_dataset.py synthetic --shape 1024,3,224,224 --classes 1000 "
               "--out big.h5'")
    sub = p.add_subparsers(dest="kind", metavar="{digits,synthetic}")
    sub.required = True
    d = sub.add_parser("digits", help="scikit-learn's bundled 8x8 handwritten digits "
                       "(1,797 samples, 10 classes) as a stratified train/test split",
                       description="Write sklearn.datasets.load_digits as float32 N×1×8×8 "
                       "images in [0, 1] (pixel/16) with a seeded stratified split into "
                       "DIR/digits_train.h5 and DIR/digits_test.h5.")
    d.add_argument("--out", required=True, metavar="DIR", help="output folder")
    d.add_argument("--seed", type=int, default=0, help="seed of the split (default 0)")
    d.add_argument("--test-size", type=int, default=360,
                   help="samples in the test split (default 360, leaving 1437 to train)")
    s = sub.add_parser("synthetic", help="random images and labels of any shape",
                       description="Write seeded random images (uniform in [0, 1) for "
                       "float32, 0..255 for uint8) and labels in [0, K), block by block.")
    s.add_argument("--shape", required=True, type=_shape, metavar="N,C,H,W",
                   help="dataset shape, e.g. 1281167,3,224,224")
    s.add_argument("--classes", required=True, type=int, metavar="K",
                   help="number of classes")
    s.add_argument("--out", required=True, metavar="FILE.h5", help="output file")
    s.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    s.add_argument("--dtype", choices=("float32", "uint8"), default="float32",
                   help="stored image dtype (default float32)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from distconv import data
    if args.kind == "digits":
        train, test = data.make_digits(args.out, seed=args.seed, test_size=args.test_size)
        print(f"wrote {train} and {test}")
    else:
        if args.classes < 1:
            print("make_dataset.py: error: --classes must be >= 1", file=sys.stderr)
            return 2
        path = data.make_synthetic(args.out, args.shape, args.classes, seed=args.seed,
                                   dtype=args.dtype)
        n, c, h, w = args.shape
        print(f"wrote {path}: images {n}x{c}x{h}x{w} {args.dtype}, {args.classes} classes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
