"""Measuring the blocks a HeLoCo correction works on: ‖Δ_b‖, ‖m_b‖ and ⟨Δ_b, m_b⟩ per block.

The three sums come from dot products, computed on the device and brought to the host in one
transfer per device; a block whose sums overflow, underflow into subnormals or are not finite is
redone in float64, and NaN or Inf in Δ or m raises ``ValueError`` there (the sums are needed anyway,
so this costs no pass of its own). Used by :func:`heloco.correction.plan_blocks`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["block_statistics", "check_blocks", "dot"]


def check_blocks(deltas: list[Tensor], moms: list[Tensor]) -> None:
    """Raise ValueError unless Δ and m pair up block by block (count, shape, dtype, device, dense float)."""
    if len(deltas) != len(moms):
        raise ValueError(
            f"pseudo_grads and momentum must have the same number of tensors, got {len(deltas)} and {len(moms)}"
        )
    for i, (d, m) in enumerate(zip(deltas, moms, strict=True)):
        if not isinstance(d, Tensor) or not isinstance(m, Tensor):
            raise ValueError(f"block {i}: pseudo_grads and momentum must hold tensors")
        if d.shape != m.shape:
            raise ValueError(
                f"block {i}: pseudo-gradient shape {tuple(d.shape)} != momentum shape {tuple(m.shape)}"
            )
        if d.dtype != m.dtype or d.device != m.device:
            raise ValueError(
                f"block {i}: pseudo-gradient ({d.dtype}, {d.device}) and momentum ({m.dtype}, {m.device}) "
                "must share dtype and device"
            )
        if not d.is_floating_point() or d.layout != torch.strided:
            raise ValueError(
                f"block {i}: only dense floating-point tensors are supported, got {d.dtype}/{d.layout}"
            )


def dot(d: Tensor, m: Tensor) -> Tensor:
    """⟨d, m⟩ over all elements, as a 0-d tensor on their device."""
    return torch.dot(d.reshape(-1), m.reshape(-1))


def block_statistics(
    deltas: list[Tensor], moms: list[Tensor], batched: bool
) -> list[tuple[float, float, float]]:
    """(‖Δ_b‖, ‖m_b‖, ⟨Δ_b, m_b⟩) per block as Python floats.

    All three come from dot products: on CPU, torch's (MKL) dot is both faster and more accurate than
    its norm kernel for large fp32 tensors. ``batched`` stacks the 3·n device scalars and moves them
    to the host in one transfer per device; otherwise each is read with ``.item()``.
    """
    n = len(deltas)
    sums: list[tuple[float, float, float]] = [(0.0, 0.0, 0.0)] * n
    if batched:
        by_device: dict[torch.device, list[int]] = {}
        for i, d in enumerate(deltas):
            by_device.setdefault(d.device, []).append(i)
        for idx in by_device.values():
            parts = [dot(deltas[i], deltas[i]) for i in idx]
            parts += [dot(moms[i], moms[i]) for i in idx]
            parts += [dot(deltas[i], moms[i]) for i in idx]
            host = torch.stack(parts).to("cpu", torch.float64).tolist()  # the one sync
            k = len(idx)
            for j, i in enumerate(idx):
                sums[i] = (host[j], host[k + j], host[2 * k + j])
    else:
        sums = [
            (dot(d, d).item(), dot(m, m).item(), dot(d, m).item()) for d, m in zip(deltas, moms, strict=True)
        ]
    out = []
    for i, (dd, mm, dm) in enumerate(sums):
        stat = (math.sqrt(dd), math.sqrt(mm), dm)
        small = math.sqrt(torch.finfo(deltas[i].dtype).tiny) * 1e4
        if not all(math.isfinite(v) for v in stat) or 0.0 < stat[0] < small or 0.0 < stat[1] < small:
            # Non-finite input, or a sum that overflowed (huge values) or lost precision to subnormals
            # (tiny values) in the tensor dtype: redo this block in float64.
            d, m = deltas[i].double(), moms[i].double()
            stat = (math.sqrt(dot(d, d).item()), math.sqrt(dot(m, m).item()), dot(d, m).item())
            if not all(math.isfinite(v) for v in stat):
                raise ValueError(f"block {i}: pseudo-gradient or momentum contains NaN or Inf")
        out.append(stat)
    return out
