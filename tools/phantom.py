"""Command line: write synthetic phantom cases in the on-disk format of models/data.py.

    python -m tools.phantom KIND --out DIR --count N --seed S [--shape X,Y,Z] [--mirrored every|odd]

KIND is any module of tools/phantoms/ other than ``common`` that defines
``generate(rng: numpy.random.Generator, shape) -> PhantomCase``; adding a file adds a kind.
Case ``k`` is drawn from ``numpy.random.default_rng([seed, k])``, so one case never depends on the count.
``--mirrored`` stores every (or every odd-numbered) case on a mirrored grid (negative-determinant affine,
same world coordinates), as real NIfTI often is.
"""
from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from tqdm import tqdm

from tools import phantoms
from tools.phantoms.common import PhantomCase, check_shape, mirror_grid, write_case

__all__ = ["available_kinds", "load_generator", "generate_cases", "main"]

DEFAULT_SHAPE = (64, 64, 64)


def available_kinds() -> list[str]:
    """Sorted names of the generator modules in tools/phantoms/ (``common`` and private modules excluded)."""
    return sorted(m.name for m in pkgutil.iter_modules(phantoms.__path__)
                  if m.name != "common" and not m.name.startswith("_"))


def load_generator(kind: str) -> Callable[[np.random.Generator, tuple[int, int, int]], PhantomCase]:
    """The ``generate`` function of tools/phantoms/``kind``.py."""
    kinds = available_kinds()
    if kind not in kinds:
        raise ValueError(f"unknown phantom kind {kind!r}; choose one of {kinds} "
                         f"(or add tools/phantoms/{kind}.py with a generate(rng, shape) function)")
    module = importlib.import_module(f"tools.phantoms.{kind}")
    generate = getattr(module, "generate", None)
    if not callable(generate):
        raise ValueError(f"tools/phantoms/{kind}.py has no generate(rng, shape) function; define one")
    return generate


MIRRORED = ("none", "every", "odd")


def generate_cases(kind: str, out: str | Path, *, count: int, seed: int,
                   shape: Sequence[int] = DEFAULT_SHAPE, progress: bool = False, mirrored: str = "none") -> list[Path]:
    """Write ``count`` cases ``{kind}_{k:04d}`` into ``out``; returns the image paths.

    ``mirrored``: "every" or "odd" cases are stored on a mirrored grid (mirror_grid, axis 0).
    """
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    if mirrored not in MIRRORED:
        raise ValueError(f"mirrored must be one of {MIRRORED}, got {mirrored!r}")
    shape = check_shape(shape)
    generate = load_generator(kind)
    paths = []
    for k in tqdm(range(count), desc=f"phantom {kind}", disable=not progress):
        phantom = generate(np.random.default_rng([seed, k]), shape)
        if mirrored == "every" or (mirrored == "odd" and k % 2):
            phantom = mirror_grid(phantom)
        paths.append(write_case(out, f"{kind}_{k:04d}", phantom))
    return paths


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tools.phantom", description=__doc__.splitlines()[0])
    p.add_argument("kind", help=f"generator: one of {available_kinds()}")
    p.add_argument("--out", required=True, type=Path, help="output directory (created)")
    p.add_argument("--count", type=int, default=8, help="number of cases")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--shape", default=",".join(map(str, DEFAULT_SHAPE)), help="volume shape X,Y,Z")
    p.add_argument("--mirrored", choices=MIRRORED, default="none",
                   help="store these cases on a mirrored grid (negative-determinant affine)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        paths = generate_cases(args.kind, args.out, count=args.count, seed=args.seed, shape=args.shape,
                               progress=True, mirrored=args.mirrored)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {len(paths)} {args.kind} cases to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
