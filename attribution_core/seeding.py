"""The one place randomness comes from.

Timesteps and noise for an example are a function of ``(seed, example_id, draw)`` and
projection matrices a function of ``(seed, layer name, side)``: never of the global RNG,
of a row's position in a batch, of the process or of the batch size. A stable 64-bit hash
(BLAKE2b; Python's ``hash`` is salted per process) turns each key into a generator seed.
"""

from __future__ import annotations

import hashlib
import math

import torch


def stable_seed(*parts: object) -> int:
    """A 63-bit integer that depends only on the text of ``parts``.

    >>> stable_seed(0, "cat.png", 3) == stable_seed(0, "cat.png", 3)
    True
    """
    h = hashlib.blake2b(digest_size=8)
    for part in parts:
        token = repr(part).encode("utf-8")
        h.update(len(token).to_bytes(4, "little"))  # length prefix: ("ab","c") != ("a","bc")
        h.update(token)
    return int.from_bytes(h.digest(), "little") & ((1 << 63) - 1)


def generator_for(*parts: object) -> torch.Generator:
    """A CPU generator seeded by ``stable_seed(*parts)``."""
    g = torch.Generator(device="cpu")
    g.manual_seed(stable_seed(*parts))
    return g


def content_id(data: bytes) -> str:
    """Identity of a query or example given by its content (hex BLAKE2b, 128 bits)."""
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def projection_matrix(seed: int, layer: str, side: str, rows: int, *, cols: int) -> torch.Tensor:
    """Gaussian ``Tensor[rows, cols]`` (float32) with entries N(0, 1/rows).

    With that scale ``E[P^T P] = I``, so inner products are preserved in expectation:
    for independent P_out, P_in, ``E <(P_out (x) P_in) vec G1, (P_out (x) P_in) vec G2> =
    <G1, G2>`` (Johnson-Lindenstrauss; TRAK and LoGra use the same scaling).
    """
    g = generator_for("projection", seed, layer, side)
    return torch.randn((rows, cols), generator=g, dtype=torch.float32) / math.sqrt(rows)
