"""The allocator setting follows the model: small blocks keep every working buffer on the heap
(fast reuse), large ones bound the heap's fragmentation (infra/memory.py)."""
from __future__ import annotations

from layerquant.config import default_model
from layerquant.infra.checkpoint import CheckpointReader
from layerquant.infra.memory import SMALL_BLOCK_BYTES, mmap_threshold


def test_a_blocks_float32_size_comes_from_the_headers():
    reader = CheckpointReader(default_model())
    largest = max(sum(4 * tensor.numel() for name, tensor in reader.block_weights(index).items()
                      if name.removesuffix(".weight") in reader.arch.linear_names)
                  for index in range(reader.n_blocks))
    assert reader.block_float32_bytes() == largest > 0


def test_small_blocks_reuse_larger_buffers_than_large_ones():
    small, large = mmap_threshold(22 << 20), mmap_threshold(205 << 20)  # Gemma 3 270M's block, the synthetic 2048-wide one
    assert small == 32 << 20 and large == 8 << 20
    assert mmap_threshold(SMALL_BLOCK_BYTES) == small and mmap_threshold(SMALL_BLOCK_BYTES + 1) == large
    assert mmap_threshold(None) == large  # before the model is known: the setting that bounds memory
