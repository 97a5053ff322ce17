"""Bit packing: exact round trips, the documented bit layout, and agreement with the clients."""
from __future__ import annotations

import pytest
import torch

from layerquant.errors import InvalidSpec
from layerquant.kernels import packing
from layerquant.kernels.packing import pack_codes, packed_length, unpack_codes

BITS = (2, 3, 4, 8)
# odd sizes: shorter than a word, one short of / one past a 32-value block, ragged everywhere
SHAPES = ((1, 1), (3, 5), (7, 31), (5, 33), (2, 100), (33, 7), (64, 172))


def _codes(shape, bits, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 1 << bits, shape, generator=g, dtype=torch.uint8)


def _stream(values, bits) -> int:
    """Independent model of the layout: one Python integer, value i at bit i*bits."""
    out = 0
    for i, v in enumerate(values):
        out |= int(v) << (i * bits)
    return out


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("axis", (0, 1))
def test_round_trip_random_odd_shapes(bits, axis):
    for i, shape in enumerate(SHAPES):
        codes = _codes(shape, bits, seed=100 * bits + i)
        words = pack_codes(codes, bits, axis)
        n = shape[axis]
        expect = list(shape)
        expect[axis] = packed_length(n, bits)
        assert words.dtype == torch.int32 and list(words.shape) == expect
        assert torch.equal(unpack_codes(words, bits, n, axis), codes)
        # the portable (any byte order) path decodes the same words to the same codes
        assert torch.equal(packing._unpack_words(words, bits, n, axis), codes)
        # non-contiguous words (a transposed buffer) decode the same
        assert torch.equal(unpack_codes(words.t().contiguous().t(), bits, n, axis), codes)


@pytest.mark.parametrize("bits", BITS)
def test_every_code_value_survives(bits):
    # all 2**bits values in every position of a 32-value block, in both axes
    row = torch.arange(32 * (1 << bits)) % (1 << bits)
    codes = torch.stack([row.roll(s) for s in range(3)]).to(torch.uint8)
    for axis in (0, 1):
        c = codes if axis == 1 else codes.t().contiguous()
        assert torch.equal(unpack_codes(pack_codes(c, bits, axis), bits, c.shape[axis], axis), c)


@pytest.mark.parametrize("bits", BITS)
def test_layout_is_the_dense_lsb_first_bitstream(bits):
    codes = _codes((4, 45), bits, seed=bits)
    words = pack_codes(codes, bits, axis=1)
    for r in range(codes.shape[0]):
        stream = _stream(codes[r].tolist(), bits)
        got = 0
        for j, w in enumerate(words[r].tolist()):
            got |= (w & 0xFFFFFFFF) << (32 * j)
        assert got == stream
    # packing along rows is packing the transpose along columns
    assert torch.equal(pack_codes(codes.t().contiguous(), bits, axis=0), words.t())


def test_known_words():
    # 4-bit: value j of a word in bits 4j..4j+3 (GPTQ / compressed-tensors order)
    w = pack_codes(torch.arange(1, 9, dtype=torch.uint8)[None], 4)
    assert (w.to(torch.int64) & 0xFFFFFFFF).tolist() == [[0x87654321]]
    # 3-bit: 32 values in exactly 3 words; value 10 straddles words 0/1, value 21 words 1/2
    codes = torch.zeros(1, 32, dtype=torch.uint8)
    codes[0, 10] = 0b111
    codes[0, 21] = 0b101
    w = (pack_codes(codes, 3).to(torch.int64) & 0xFFFFFFFF)[0].tolist()
    assert w == [0b11 << 30, (0b1 << 0) | (0b1 << 31), 0b10]


def test_matches_compressed_tensors_pack_to_int32():
    helpers = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")
    for bits in BITS:
        for i, shape in enumerate(SHAPES):
            codes = _codes(shape, bits, seed=7 * bits + i)
            signed = (codes.to(torch.int32) - (1 << (bits - 1))).to(torch.int8)  # their value convention
            for axis in (0, 1):
                theirs = helpers.pack_to_int32(signed, bits, packed_dim=axis)
                assert torch.equal(pack_codes(codes, bits, axis), theirs), (bits, shape, axis)
                if axis == 0 and theirs.shape[0] == 1:
                    # compressed-tensors 0.20.0's 4-bit unpack of a single packed row along dim 0
                    # fails on a stride check (a 1-row transpose it thinks is contiguous)
                    continue
                back = helpers.unpack_from_int32(theirs, bits, torch.Size(shape), packed_dim=axis)
                assert torch.equal(back, signed)


def test_bad_inputs_raise_typed_errors():
    codes = torch.tensor([[0, 16]], dtype=torch.uint8)
    with pytest.raises(InvalidSpec, match="outside the 4-bit range"):
        pack_codes(codes, 4)
    with pytest.raises(InvalidSpec, match="bits=5"):
        pack_codes(codes, 5)
    with pytest.raises(InvalidSpec, match="integer"):
        pack_codes(codes.float(), 8)
    with pytest.raises(InvalidSpec, match="axis"):
        pack_codes(codes, 8, axis=2)
    words = pack_codes(torch.zeros(2, 40, dtype=torch.uint8), 3)
    with pytest.raises(InvalidSpec, match="cannot hold exactly"):
        unpack_codes(words, 3, 50)
    with pytest.raises(InvalidSpec, match="int32"):
        unpack_codes(words.to(torch.int64), 3, 40)
