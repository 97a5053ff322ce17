"""Hessian of a linear layer's reconstruction loss, H = 2/n * sum x x^T, streamed over samples
and summed in an order that does not depend on how the samples are sharded."""
from __future__ import annotations

from collections.abc import Iterable

import torch

from layerquant.errors import HessianNotPositiveDefinite


def batch_gram(inputs: torch.Tensor) -> tuple["GramPanels", int]:
    """(X^T X of one batch of layer inputs [..., in_features] as `GramPanels`, its row count).

    The batch's own Gram matrix is formed in float32: a batch is a few thousand rows, whose
    float32 sum is good to ~1e-6 relative (GPTQ factors in float32 anyway), and the float64
    product was a sixth of a block's quantization time. Batches are summed in float64 (so long
    calibration runs lose no small contributions) in a fixed order: `PairwiseSum`, which takes
    the float32 Gram as it is and widens it when it adds it (exactly: every float32 is a
    float64), so a leaf waiting for its sibling holds half the memory."""
    x = inputs.reshape(-1, inputs.shape[-1]).to(torch.float32)
    return gram_panels(x), x.shape[0]


# column panel width of `gram_panels`: panels of this size keep each product large enough
# for BLAS to run at full speed
_GRAM_PANEL = 512


class GramPanels:
    """A symmetric [n, n] Gram matrix, or a sum of them, kept as its upper triangle in row
    panels: panel i holds rows [s_i, s_i + w_i) from column s_i on (one panel: the whole
    matrix). For p panels that is (p + 1) / 2p of the full matrix: 55% for a 5632-wide down_proj
    input, whose float64 sums are a block's largest buffers. Sums are taken panel by panel, so
    every entry is the same float64 addition as on full matrices; the lower triangle is the
    mirror, as it is in each batch's Gram."""

    def __init__(self, panels: list[torch.Tensor]):
        self.panels = panels

    @property
    def size(self) -> int:
        return int(self.panels[0].shape[1])

    @property
    def dtype(self) -> torch.dtype:
        return self.panels[0].dtype

    def to(self, dtype: torch.dtype) -> "GramPanels":
        return GramPanels([panel.to(dtype) for panel in self.panels])

    def clone(self) -> "GramPanels":
        return GramPanels([panel.clone() for panel in self.panels])

    def add_(self, other: "GramPanels") -> "GramPanels":
        for panel, addend in zip(self.panels, other.panels, strict=True):
            panel.add_(addend)
        return self

    def _fill(self, out: torch.Tensor, scale: float | None = None) -> torch.Tensor:
        start = 0
        for panel in self.panels:
            end = start + panel.shape[0]
            if scale is not None:
                panel = panel.mul_(scale)
            out[start:end, start:] = panel
            out[end:, start:end] = panel[:, end - start :].T
            start = end
        return out

    def full(self) -> torch.Tensor:
        """The [n, n] matrix in the panels' dtype."""
        return self._fill(torch.empty(self.size, self.size, dtype=self.dtype, device=self.panels[0].device))

    def hessian(self, rows: int) -> torch.Tensor:
        """H = 2/rows * sum X^T X in float32 (how GPTQ factors it), scaled in float64 panel by
        panel (overwriting them): the same bits as scaling the float64 full matrix and rounding
        it, without ever holding that matrix."""
        out = torch.empty(self.size, self.size, dtype=torch.float32, device=self.panels[0].device)
        return self._fill(out, 2.0 / rows)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The panels by name, to store; `from_tensors` reads them back."""
        return {f"panel.{i:03d}": panel for i, panel in enumerate(self.panels)}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> "GramPanels":
        return cls([tensors[name] for name in sorted(tensors) if name.startswith("panel.")])


def gram_panels(x: torch.Tensor) -> GramPanels:
    """X^T X of x [rows, n] computed a column panel at a time, upper triangle only: about
    (p + 1) / 2p of the multiply-adds for p panels. Each entry is the same dot product over the
    rows as in X^T X (it matched x.T @ x to the bit on 640- to 2048-wide inputs).
    2048 wide, 4096 rows, 2 cores: 209 ms against 347 ms."""
    n = x.shape[1]
    panels = -(-n // _GRAM_PANEL)
    if panels < 2:
        return GramPanels([x.T @ x])
    width = -(-n // panels)
    # [panel, n - start]: the panel's row of blocks, from the diagonal on
    return GramPanels([x[:, start : min(start + width, n)].T @ x[:, start:] for start in range(0, n, width)])


def symmetric_gram(x: torch.Tensor) -> torch.Tensor:
    """X^T X [n, n] by `gram_panels`, mirrored: exactly symmetric."""
    return gram_panels(x).full()


class PairwiseSum:
    """Sum of leaves added in index order, over a fixed binary tree: leaf i and leaf i^1 are
    added first, then their pairs, and so on (a perfect tree over the next power of two, absent
    leaves skipped). Floating-point sums depend on their order; this one depends only on the
    leaves' global indices, so a shard that sums an aligned run of 2^k leaves gets exactly the
    tree's node over them, and the nodes of 2^j shards summed by another PairwiseSum give
    exactly the single-process total: 1, 2 or 4 shards give bit-identical Hessians.

    Memory: at most log2(leaves) + 1 partial sums are alive (a stack, as in a binary counter).
    `add(None)` counts an absent leaf (an empty shard). Leaves may be float32 (batch Grams); every
    sum is float64, and so is `total()`."""

    def __init__(self) -> None:
        self._stack: list[tuple[int, torch.Tensor | None]] = []  # (tree level, node sum)

    def add(self, leaf: torch.Tensor | None) -> None:
        level, node = 0, leaf
        while self._stack and self._stack[-1][0] == level:
            _, left = self._stack.pop()
            node = _add_nodes(left, node)
            level += 1
        self._stack.append((level, node))

    def total(self) -> torch.Tensor | None:
        """The root over the leaves so far; unfinished subtrees fold right to left, as the
        perfect tree with its missing right leaves absent would."""
        node = None
        for _, left in reversed(self._stack):
            node = _add_nodes(left, node)
        return node if node is None or node.dtype == torch.float64 else node.to(torch.float64)


def _add_nodes(left: torch.Tensor | None, right: torch.Tensor | None) -> torch.Tensor | None:
    if left is None:
        return right
    if right is None:
        return left
    # the left node is owned by the tree: its memory is reused once it is float64 (a float32
    # leaf is widened first; the float32 right side is widened exactly by the in-place add)
    return (left if left.dtype == torch.float64 else left.to(torch.float64)).add_(right)


def merge_partials(partials: Iterable[torch.Tensor | GramPanels | None], owned: bool = False) -> torch.Tensor | GramPanels | None:
    """The tree's upper levels over shard partial sums given in shard order (a power of two of
    them, each the sum of an aligned run of leaves: see `shard_batches`). The tree sums in place:
    the callers' partials are copied first unless `owned` (e.g. read from the store one at a time,
    so at most two are alive)."""
    tree = PairwiseSum()
    for partial in partials:
        tree.add(partial.clone() if partial is not None and not owned else partial)
    return tree.total()


def hessian_from_sum(gram_sum: torch.Tensor | GramPanels, rows: int) -> torch.Tensor:
    """H = 2/n * sum X^T X from the exact-order float64 sum of batch Grams (overwritten),
    handed on in float32: GPTQ factors in float32."""
    if isinstance(gram_sum, GramPanels):
        return gram_sum.hessian(rows)
    return gram_sum.mul_(2.0 / rows).to(torch.float32)


def next_power_of_two(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def shard_batches(n_batches: int, n_shards: int, shard: int) -> range:
    """The global batch indices shard `shard` of `n_shards` (a power of two) owns: an aligned
    subtree of the fixed summation tree, so its partial sum is one of the tree's nodes."""
    if n_shards < 1 or n_shards & (n_shards - 1):
        raise ValueError(f"the shard count must be a power of two, not {n_shards}")
    span = max(1, next_power_of_two(n_batches) // n_shards)
    return range(min(shard * span, n_batches), min((shard + 1) * span, n_batches))


def damped_inverse_cholesky(
    hessian: torch.Tensor, damp_percent: float, layer: str, max_attempts: int = 6, perm: torch.Tensor | None = None,
    consume: bool = False,
) -> tuple[torch.Tensor, float, float]:
    """Upper Cholesky factor of H^-1 after damping; damping grows x10 until H is positive definite.
    `perm`: the column order to factor in (GPTQ's act_order), the natural order by default.

    Dead inputs (zero diagonal: a channel that never fires) get a unit diagonal so they cannot
    make H singular; GPTQ zeroes their weight columns separately.
    Works in the Hessian's dtype (GPTQ factors in float32; damping absorbs the rounding).
    Returns the factor, the damping fraction that worked and the amount it added to the
    diagonal (damping x the mean diagonal).

    Memory (a 5632-wide down_proj's Hessian-sized buffers are 127 MB each): by default the
    caller's Hessian stays intact, so each attempt damps a copy, dropped once factored; three
    buffers are alive at the peak, the caller's included (torch's cholesky_inverse allocates
    its result even when given `out`). `consume=True` hands the Hessian over: it is damped in
    place and its storage is freed once factored (every reference to it then sees an empty
    tensor), so two are alive at the peak; same factor to the bit. Should the inverse then fail
    to factor (rounding; not seen on real layers), the next attempt damps the Hessian rebuilt
    from that inverse, which equals it to float32 rounding.
    """
    diagonal = torch.diag(hessian) if perm is None else torch.diag(hessian)[perm]
    diagonal = torch.where(diagonal == 0, torch.ones_like(diagonal), diagonal)
    mean_diag = diagonal.mean().item()
    if consume:
        h = hessian
        if perm is not None:  # rows, then columns: the previous copy freed at each step
            for dim in (0, 1):
                permuted = h.index_select(dim, perm)
                _release(h)
                h = permuted
            del permuted
    else:
        h = None
    damp = damp_percent
    for _ in range(max_attempts):
        if not consume:
            h = hessian.clone() if perm is None else hessian.index_select(0, perm).index_select(1, perm)
        h.diagonal().copy_(diagonal + damp * mean_diag)
        chol, info = torch.linalg.cholesky_ex(h)
        if info.item() == 0:
            if consume:
                _release(h)
            h = None
            inverse = torch.cholesky_inverse(chol)
            del chol
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            if info.item() == 0 and _all_finite(upper):
                return upper, damp, damp * mean_diag
            del upper
            if consume:  # the Hessian is gone: rebuild it (its diagonal is reset below)
                h = torch.linalg.inv(inverse)
            del inverse
        elif not consume:
            h = None
        damp *= 10
    raise HessianNotPositiveDefinite(layer, damp / 10)


def _all_finite(matrix: torch.Tensor, rows: int = 256) -> bool:
    """isfinite(matrix).all() a few rows at a time: on the whole matrix, isfinite's temporaries
    are 1.7 times its size (a float64 sum, twice)."""
    return all(bool(torch.isfinite(matrix[start : start + rows]).all()) for start in range(0, matrix.shape[0], rows))


def _release(tensor: torch.Tensor) -> None:
    """Free a tensor's memory now, whoever else holds it (they see an empty tensor). Memory
    torch does not own (a tensor over a numpy array or a read buffer) stays where it is."""
    storage = tensor.untyped_storage()
    if storage.resizable():
        storage.resize_(0)
