"""Phantom generators: each module KIND.py (other than ``common``) exposes
``generate(rng: numpy.random.Generator, shape) -> PhantomCase``; ``python -m tools.phantom`` finds them."""
