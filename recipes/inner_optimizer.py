"""The workers' inner optimizer besides AdamW: Muon for the hidden weight matrices, AdamW for the rest.

``inner_optimizer: muon`` follows torch's documentation of ``torch.optim.Muon`` (torch >= 2.9): Muon
orthogonalises the momentum of 2-D hidden-layer matrices (Newton–Schulz, Jordan et al. 2024), and the
other parameters (embeddings, the output head, biases, norms) are trained by AdamW. Muon's learning
rate is adjusted with ``adjust_lr_fn="match_rms_adamw"`` (Liu et al. 2025, arXiv 2502.16982: the
update's RMS matches AdamW's), so one ``inner_lr`` and one weight decay serve both and the recipes' lr
schedules, which set every param group's ``lr``, scale both alike.

``MuonAdamW`` steps the two as one ``torch.optim.Optimizer``, so everything that handles the inner
AdamW handles it unchanged: the lr schedule (``param_groups``), ``reset_inner_optimizer``
(``state.clear()``), the warm start and checkpoints (``state_dict``/``load_state_dict``, one flat
state with Muon's tensors first), offloading idle workers (``state.values()``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

__all__ = ["INNER_OPTIMIZERS", "MuonAdamW", "muon_split"]

INNER_OPTIMIZERS = ("adamw", "muon")


def muon_split(model: torch.nn.Module) -> tuple[list[Tensor], list[Tensor]]:
    """(Muon's parameters, AdamW's), in ``model.parameters()`` order: the 2-D weight matrices of the
    hidden layers, and the rest (every ``nn.Embedding``, the output head of
    ``model.get_output_embeddings()`` when it has one, biases, norms)."""
    excluded = {id(p) for m in model.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters()}
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if isinstance(head, torch.nn.Module):
        excluded |= {id(p) for p in head.parameters()}
    matrices, others = [], []
    for p in model.parameters():
        (matrices if p.ndim == 2 and id(p) not in excluded else others).append(p)
    return matrices, others


class MuonAdamW(torch.optim.Optimizer):
    """``torch.optim.Muon`` over ``matrices`` and ``torch.optim.AdamW`` over ``others``, as one optimizer.

    ``param_groups`` is Muon's group followed by AdamW's (the very dicts the two read, so setting a
    group's ``lr`` sets it for the optimizer that owns it) and ``state`` is one mapping both share;
    ``load_state_dict`` re-links them. Either list may be empty (that optimizer is then left out).

    Args:
        lr: both optimizers' learning rate (Muon's adjusted by ``adjust_lr_fn``).
        betas, weight_decay, fused: AdamW's (``weight_decay`` is also Muon's decoupled decay).
        muon_momentum: Muon's momentum μ (Nesterov), torch's default 0.95.
        adjust_lr_fn: Muon's ``"match_rms_adamw"`` (lr·0.2·√max(A, B)) or ``"original"``
            (lr·√max(1, A/B)).
    """

    def __init__(
        self,
        matrices: Iterable[Tensor],
        others: Iterable[Tensor],
        *,
        lr: float,
        betas: tuple[float, float] = (0.9, 0.999),
        weight_decay: float = 0.01,
        muon_momentum: float = 0.95,
        adjust_lr_fn: str = "match_rms_adamw",
        fused: bool | None = None,
    ) -> None:
        matrices, others = list(matrices), list(others)
        self.parts: list[torch.optim.Optimizer] = []
        if matrices:
            self.parts.append(
                torch.optim.Muon(
                    matrices,
                    lr=lr,
                    weight_decay=weight_decay,
                    momentum=muon_momentum,
                    adjust_lr_fn=adjust_lr_fn,
                )
            )
        if others:
            self.parts.append(
                torch.optim.AdamW(others, lr=lr, betas=betas, weight_decay=weight_decay, fused=fused)
            )
        if not self.parts:
            raise ValueError("MuonAdamW got no parameters")
        super().__init__([group for part in self.parts for group in part.param_groups], defaults={})
        self._link()

    def _link(self) -> None:
        """Point each part at its slice of ``param_groups`` and at the shared ``state``."""
        start = 0
        for part in self.parts:
            n = len(part.param_groups)
            part.param_groups = self.param_groups[start : start + n]
            part.state = self.state
            start += n

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._link()

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for part in self.parts:
            part.step()
        return loss
