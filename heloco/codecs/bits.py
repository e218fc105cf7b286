"""Bit packing of top-k's entries and counts, vectorised over the values (no Python loop over
entries): a b-bit field per entry is what makes a kept entry cost ~2 bytes instead of 8."""

from __future__ import annotations

import torch
from torch import Tensor

from heloco.codecs.wire import MalformedMessage


def pack_bits(values: Tensor, width: int) -> Tensor:
    """Pack non-negative integers < 2**width (width ≤ 31) into ⌈len·width/8⌉ bytes, least
    significant bit first: bit j of value i is bit (i·width + j) of the stream, and bit t of the
    stream is bit t mod 8 of byte ⌊t/8⌋. Trailing bits of the last byte are 0.

    Vectorised over the values, not their bits: value i lands at bit s = (i·width) mod 32 of 32-bit
    word ⌊i·width/32⌋, its low 32 − s bits there and the rest in the next word (v·2^s < 2^62 fits
    int64; bits never overlap, so adding them is or-ing them)."""
    count = values.numel()
    nbytes = -(-count * width // 8)
    position = torch.arange(count, dtype=torch.int64) * width
    shifted = values.reshape(-1).to(torch.int64) << (position & 31)
    words = torch.zeros(-(-nbytes // 4) + 1, dtype=torch.int64)
    words.index_add_(0, position >> 5, shifted & 0xFFFFFFFF)
    words.index_add_(0, (position >> 5) + 1, shifted >> 32)
    return ((words[:-1].unsqueeze(1) >> BYTE_SHIFTS) & 0xFF).to(torch.uint8).view(-1)[:nbytes]


def unpack_bits(data: Tensor, count: int, width: int) -> Tensor:
    """The ``count`` integers of ``width`` bits that ``pack_bits`` wrote into ``data`` (int32)."""
    if data.numel() * 8 < count * width:
        raise MalformedMessage(f"truncated bit stream: {data.numel()} bytes for {count} × {width} bits")
    padded = torch.zeros(-(-data.numel() // 4) * 4 + 4, dtype=torch.int64)
    padded[: data.numel()] = data
    words = (padded.view(-1, 4) << BYTE_SHIFTS).sum(1)  # little-endian 32-bit words, one spare
    position = torch.arange(count, dtype=torch.int64) * width
    word = position >> 5
    # bits s .. s + width − 1 ≤ 61 of (word + next word · 2^32): the next word's low 30 bits suffice
    pair = words[word] | ((words[word + 1] & 0x3FFFFFFF) << 32)
    return ((pair >> (position & 31)) & ((1 << width) - 1)).to(torch.int32)


BYTE_SHIFTS = torch.tensor([0, 8, 16, 24], dtype=torch.int64)
