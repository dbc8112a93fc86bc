"""Stable seeds derived from tuples of integers (seed, epoch, index, stream, ...).

Why not Python's `hash`: it is salted per process for str and not meant to be stable; and why not
`seed + epoch * N + i`: nearby keys would give correlated torch seeds. A SplitMix64-style mix of each
component gives well-spread 63-bit seeds that are the same in every process, worker and machine.
"""

from __future__ import annotations

import torch

_MASK = 0xFFFFFFFFFFFFFFFF


def derive_seed(*key: int) -> int:
    """A non-negative 63-bit integer determined by `key` alone (order matters)."""
    h = 0x9E3779B97F4A7C15
    for k in key:
        h = (h ^ (int(k) & _MASK)) & _MASK
        h = (h + 0x9E3779B97F4A7C15) & _MASK
        h = ((h ^ (h >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
        h = ((h ^ (h >> 27)) * 0x94D049BB133111EB) & _MASK
        h ^= h >> 31
    return h & 0x7FFFFFFFFFFFFFFF


def generator(*key: int) -> torch.Generator:
    """A CPU `torch.Generator` seeded with `derive_seed(*key)`."""
    return torch.Generator().manual_seed(derive_seed(*key))
