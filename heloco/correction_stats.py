"""What one HeLoCo correction did (``CorrectionStats``), counted over blocks and their elements.

A module of its own so that the statistics, which are logged and combined, do not depend on the
correction's tensor math (:mod:`heloco.correction`, which re-exports ``CorrectionStats``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

__all__ = ["CorrectionStats"]


@dataclass
class CorrectionStats:
    """What one correction did, counted over blocks (= parameter tensors) and over their elements."""

    blocks_kept: int = 0
    blocks_shrunk: int = 0
    blocks_reoriented: int = 0
    elements_kept: int = 0
    elements_shrunk: int = 0
    elements_reoriented: int = 0
    cosines: list[float] = field(default_factory=list)  # cos(Δ_b, m_b) per block, 0.0 where a norm is 0
    betas: list[float] = field(default_factory=list)  # β_b of every shrunk block
    lambdas: list[float] = field(default_factory=list)  # λ_b of every reoriented block
    relative_changes: list[float] = field(default_factory=list)  # ‖Δ̂_b − Δ_b‖ / ‖Δ_b‖ per block (0: kept)

    @property
    def num_blocks(self) -> int:
        return self.blocks_kept + self.blocks_shrunk + self.blocks_reoriented

    @property
    def num_elements(self) -> int:
        return self.elements_kept + self.elements_shrunk + self.elements_reoriented

    def as_dict(self) -> dict[str, float]:
        """Flat, JSON-able summary for logging: fractions of blocks/elements per branch, cosine stats."""
        nb, ne = max(self.num_blocks, 1), max(self.num_elements, 1)
        cos = self.cosines
        return {
            "frac_blocks_kept": self.blocks_kept / nb,
            "frac_blocks_shrunk": self.blocks_shrunk / nb,
            "frac_blocks_reoriented": self.blocks_reoriented / nb,
            "frac_elements_kept": self.elements_kept / ne,
            "frac_elements_shrunk": self.elements_shrunk / ne,
            "frac_elements_reoriented": self.elements_reoriented / ne,
            "frac_blocks_corrected": (self.blocks_shrunk + self.blocks_reoriented) / nb,
            "mean_cosine": sum(cos) / len(cos) if cos else 0.0,
            "min_cosine": min(cos) if cos else 0.0,
            # over all blocks (a kept one counts 0), as the authors' logs average them
            "mean_beta": sum(self.betas) / nb,
            "mean_lambda": sum(self.lambdas) / nb,
            "mean_relative_change": _mean(self.relative_changes),
        }

    @classmethod
    def concat(cls, parts: Iterable[CorrectionStats]) -> CorrectionStats:
        """Combine the statistics of several corrections (e.g. one per parameter group)."""
        out = cls()
        for p in parts:
            out.blocks_kept += p.blocks_kept
            out.blocks_shrunk += p.blocks_shrunk
            out.blocks_reoriented += p.blocks_reoriented
            out.elements_kept += p.elements_kept
            out.elements_shrunk += p.elements_shrunk
            out.elements_reoriented += p.elements_reoriented
            out.cosines.extend(p.cosines)
            out.betas.extend(p.betas)
            out.lambdas.extend(p.lambdas)
            out.relative_changes.extend(p.relative_changes)
        return out


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0
