"""Orthogonal Hadamard matrices for any width that is a multiple of 4.

Rotating a layer's input by an orthogonal Q (x -> x Q, W -> W Q) leaves its output unchanged
while spreading an outlier channel over all channels (QuaRot, arXiv 2404.00456): what makes
4-bit and 3-bit activations usable. A Hadamard matrix does that with entries of equal
magnitude, so no channel keeps its outlier.

Construction, by width n:
- n a power of two: Sylvester's doubling.
- n = 2^k * m, m of a Paley construction (m = q + 1 with q a prime = 3 mod 4, or
  m = 2 (q + 1) with q a prime = 1 mod 4; this covers the classic base orders 12 and 20):
  the base matrix Kronecker a Sylvester matrix.
- otherwise (stories260K's intermediate 172 = 4 * 43 has no such form): block-diagonal of the
  two most balanced constructible orders (172 = 84 + 88), or greedily of the largest
  constructible ones. Still orthogonal, so every fold stays exact; only the mixing is confined
  to each block.
All normalized (H H^T = I). Pure torch, float64 construction, cast by the caller.
"""
from __future__ import annotations

import torch

from layerquant.errors import InvalidSpec


def _is_prime(q: int) -> bool:
    if q < 2:
        return False
    factor = 2
    while factor * factor <= q:
        if q % factor == 0:
            return False
        factor += 1
    return True


def _sylvester(n: int) -> torch.Tensor:
    matrix = torch.ones(1, 1, dtype=torch.float64)
    while matrix.shape[0] < n:
        matrix = torch.cat([torch.cat([matrix, matrix], 1), torch.cat([matrix, -matrix], 1)], 0)
    return matrix


def _jacobsthal(q: int) -> torch.Tensor:
    """Q[i, j] = Legendre symbol of (j - i) mod q, for a prime q."""
    residues = {(x * x) % q for x in range(1, q)}
    chi = torch.tensor([0.0] + [1.0 if a in residues else -1.0 for a in range(1, q)], dtype=torch.float64)
    index = (torch.arange(q)[None, :] - torch.arange(q)[:, None]) % q
    return chi[index]


def _paley1(q: int) -> torch.Tensor:
    """Order q + 1, q a prime = 3 mod 4: I + [[0, 1^T], [-1, Q]] (Q is skew-symmetric)."""
    skew = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    skew[0, 1:] = 1.0
    skew[1:, 0] = -1.0
    skew[1:, 1:] = _jacobsthal(q)
    return torch.eye(q + 1, dtype=torch.float64) + skew


def _paley2(q: int) -> torch.Tensor:
    """Order 2 (q + 1), q a prime = 1 mod 4: C = [[0, 1^T], [1, Q]] is symmetric and every
    entry of C becomes a 2x2 block (0 -> [[1, -1], [-1, -1]], +-1 -> +-[[1, 1], [1, -1]])."""
    conference = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    conference[0, 1:] = 1.0
    conference[1:, 0] = 1.0
    conference[1:, 1:] = _jacobsthal(q)
    on_zero = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
    on_sign = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    return torch.kron(conference, on_sign) + torch.kron(torch.eye(q + 1, dtype=torch.float64), on_zero)


def _base(m: int) -> torch.Tensor | None:
    """A +-1 Hadamard matrix of order m from a Paley construction, or None."""
    if m % 4:
        return None
    if (m - 1) % 4 == 3 and _is_prime(m - 1):
        return _paley1(m - 1)
    if (m // 2 - 1) % 4 == 1 and _is_prime(m // 2 - 1):
        return _paley2(m // 2 - 1)
    return None


def _plain(n: int) -> torch.Tensor | None:
    """A +-1 Hadamard matrix of order n: 2^k Sylvester, or a Paley base Kronecker Sylvester."""
    if n & (n - 1) == 0:
        return _sylvester(n)
    power = 1
    while n % power == 0:
        base = _base(n // power)
        if base is not None:
            return torch.kron(base, _sylvester(power))
        power *= 2
    return None


def block_orders(n: int) -> list[int]:
    """The orders of the diagonal blocks a width-n Hadamard rotation is built from: [n] when
    one matrix of that order can be built, else the most balanced constructible pair, else the
    largest constructible orders first."""
    if n < 4 or n % 4:
        raise InvalidSpec(f"a Hadamard rotation needs a width that is a multiple of 4, got {n}",
                          "rotate only models whose hidden, head and intermediate sizes are multiples of 4")
    if _plain(n) is not None:
        return [n]
    for first in range((n // 2) // 4 * 4, 3, -4):
        if _plain(first) is not None and _plain(n - first) is not None:
            return [first, n - first]
    orders, left = [], n
    while left:
        size = next(size for size in range(left, 3, -4) if _plain(size) is not None)
        orders.append(size)
        left -= size
    return orders


def hadamard(n: int) -> torch.Tensor:
    """An orthogonal [n, n] float64 Hadamard matrix (block-diagonal when no single one of order
    n is built here; see the module docstring)."""
    blocks = [_plain(order) / order**0.5 for order in block_orders(n)]
    return torch.block_diag(*blocks)


def random_hadamard(n: int, seed: int = 0) -> torch.Tensor:
    """hadamard(n) with its rows' signs flipped at random (seeded): QuaRot's randomized
    Hadamard. Still orthogonal; the random signs keep a structured input (e.g. one constant
    channel) from landing on a single output channel."""
    generator = torch.Generator().manual_seed(seed)
    signs = torch.randint(0, 2, (n,), generator=generator).to(torch.float64) * 2 - 1
    return signs[:, None] * hadamard(n)
