"""Outer optimizers for DiLoCo-style training, as ordinary ``torch.optim.Optimizer`` subclasses.

The pseudo-gradient Δ = θ_global − θ_local is read from ``p.grad`` (parameters without a grad are
skipped), so these work wherever a torch optimizer is expected (LR schedulers, checkpointing, other
DiLoCo wrappers). The outer momentum lives in ``state[p]["momentum_buffer"]`` as in ``torch.optim.SGD``.
Both implement ``heloco.protocols.StalenessAwareOptimizer``: ``step`` takes two optional keyword
arguments from an asynchronous server, ``staleness`` (τ of the submitted Δ, ``None`` = unknown) and
``weight`` (a scalar the update is multiplied by), and ``last_stats`` tells what the step did.

The classes are thin, as torch's are: ``step`` validates its arguments, gathers each param group's
tensors (checking everything before changing anything) and calls the functional step of
:mod:`heloco.functional`. Hyperparameters are validated once, when they are set (constructor,
``add_param_group``, ``load_state_dict``), not on every step. ``foreach=None`` selects the
``torch._foreach_*`` path on every device: on CPU those ops run the same per-tensor kernels in one
C++ loop, which saves Python overhead, and on accelerators they are fused.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import fields
from typing import Any

import torch
from torch import Tensor
from torch.optim.optimizer import Optimizer, ParamsT

from heloco.correction import CorrectionHParams, CorrectionStats, validate_correction_hparams
from heloco.functional import delayed_nesterov_step, heloco_step, plan_heloco_correction
from heloco.presets import (
    CORRECTION_SUPPORTS,
    DELAYED_NESTEROV_DEFAULTS,
    HELOCO_DEFAULTS,
    HELOCO_PRESETS,
    HELOCO_VARIANTS,
)
from heloco.validation import check_number, is_int

__all__ = [
    "CORRECTION_SUPPORTS",
    "DELAYED_NESTEROV_DEFAULTS",
    "HELOCO_DEFAULTS",
    "HELOCO_PRESETS",
    "HELOCO_VARIANTS",
    "DelayedNesterov",
    "HeLoCo",
]


def _check_foreach(foreach: object) -> None:
    if foreach is not None and not isinstance(foreach, bool):
        raise ValueError(f"foreach must be None, True or False, got {foreach!r}")


def _check_step_args(staleness: int | None, weight: float | None) -> None:
    if staleness is not None and (not is_int(staleness) or staleness < 0):
        raise ValueError(f"staleness must be None or an int >= 0, got {staleness!r}")
    if weight is not None:
        check_number("weight", weight, 0.0)


def _group_hparams(group: Mapping[str, Any], defaults: Mapping[str, Any]) -> dict[str, Any]:
    """A loaded group's hyperparameters, missing ones filled in from ``defaults`` (``params`` left out)."""
    return {**defaults, "foreach": None, **{k: v for k, v in group.items() if k != "params"}}


class _Gathered:
    """One param group's tensors for a step: those with a grad, their grads and momentum buffers.
    Buffers a first step needs are made here but enter the state only in ``install``, so a step
    that fails validation leaves the state as it was."""

    def __init__(self, opt: Optimizer, group: dict[str, Any]) -> None:
        self.opt = opt
        self.group = group
        self.params: list[Tensor] = []
        self.grads: list[Tensor] = []
        self.momentum_buffers: list[Tensor] = []
        self.new: dict[Tensor, dict[str, Any]] = {}  # state entries to add, per parameter
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise ValueError(f"{type(opt).__name__} does not support sparse gradients")
            self.params.append(p)
            self.grads.append(p.grad)
            buf = opt.state.get(p, {}).get("momentum_buffer")
            if buf is None:
                buf = self.add_state(
                    p, momentum_buffer=torch.zeros_like(p, memory_format=torch.preserve_format)
                )["momentum_buffer"]
            self.momentum_buffers.append(buf)

    def add_state(self, p: Tensor, **entries: Any) -> dict[str, Any]:
        """Record state entries for ``p`` to add in ``install``; return p's state as it will be."""
        self.new.setdefault(p, {}).update(entries)
        return {**self.opt.state.get(p, {}), **self.new[p]}

    def install(self) -> None:
        for p, entries in self.new.items():
            self.opt.state[p].update(entries)
        self.new = {}

    @property
    def foreach(self) -> bool:
        return self.group["foreach"] is not False


class HeLoCo(Optimizer):
    """EMA-form Nesterov outer step with HeLoCo's pseudo-gradient correction (arXiv 2606.00271).

    Per step, with Δ from ``p.grad`` and w the optional arrival ``weight``: Δ is corrected block by
    block against the current momentum m (see :mod:`heloco.correction`) unless ``variant="none"``,
    or the arrival is fresh (``staleness=0``) and ``correct_fresh=False``. With
    ``weight_before_correction`` the correction sees wΔ (w enters its confidence), as in the
    authors' experiments; otherwise it sees Δ and w scales the result. Then, with G = w·Δ̂::

        m ← μ·m + (1 − μ)·G
        θ ← θ − η·(G + μ_s·m)

    with μ_s = ``step_momentum``, μ unless set (the paper). ``step_momentum=0.0`` (ours) steps by the
    corrected Δ alone, plain SGD as in SparseLoCo's server, while m still tracks the arrivals as the
    correction's reference direction: the two jobs of the momentum are separated. A look-ahead
    dispatch (``heloco.lookahead``) extrapolates by μ_s too, so with μ_s = 0 workers get θ itself.

    ``correction_support="nonzero"`` (ours, for sparse codecs such as top-k) compares Δ with the
    momentum only where Δ is non-zero, m_S = m·1[Δ ≠ 0], and corrects with it (Δ̂_b = s_b·Δ_b +
    r_b·m_S,b), so the corrected Δ keeps Δ's support. With "all" (the paper) a Δ that is 99% zeros
    has a cosine of at most ‖m_S‖/‖m‖ against m even where it agrees with m, so nearly every block is
    reoriented, and the reorientation adds a dense piece of m. On a Δ without zeros the two agree.

    ``HeLoCo(params)`` is the authors' method with their values (``HELOCO_DEFAULTS``);
    ``HeLoCo.from_preset(params, "tiny_sweep")`` gives our swept values (``HELOCO_PRESETS``).
    ``p.grad`` is never modified: corrected blocks go to per-parameter scratch buffers that are
    reused across steps and are not part of ``state_dict``. m starts at zero, so the first update is
    never corrected. ``last_stats`` holds the :class:`~heloco.correction.CorrectionStats` of the latest
    step, or None if nothing was corrected. Every group is measured and planned before any is
    updated, so a step that raises (NaN or Inf in Δ or m) changes nothing.
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float = HELOCO_DEFAULTS["lr"],
        momentum: float = HELOCO_DEFAULTS["momentum"],
        keep_threshold: float = HELOCO_DEFAULTS["keep_threshold"],
        shrink_strength: float = HELOCO_DEFAULTS["shrink_strength"],
        shrink_max: float = HELOCO_DEFAULTS["shrink_max"],
        reorient_strength: float = HELOCO_DEFAULTS["reorient_strength"],
        kappa: float = HELOCO_DEFAULTS["kappa"],
        eps: float = HELOCO_DEFAULTS["eps"],
        correct_fresh: bool = HELOCO_DEFAULTS["correct_fresh"],
        reorient_schedule: str = HELOCO_DEFAULTS["reorient_schedule"],
        cos_bad: float = HELOCO_DEFAULTS["cos_bad"],
        weight_before_correction: bool = HELOCO_DEFAULTS["weight_before_correction"],
        variant: str = HELOCO_DEFAULTS["variant"],
        correction_support: str = HELOCO_DEFAULTS["correction_support"],
        step_momentum: float | None = HELOCO_DEFAULTS["step_momentum"],
        foreach: bool | None = None,
    ) -> None:
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "keep_threshold": keep_threshold,
            "shrink_strength": shrink_strength,
            "shrink_max": shrink_max,
            "reorient_strength": reorient_strength,
            "kappa": kappa,
            "eps": eps,
            "correct_fresh": correct_fresh,
            "reorient_schedule": reorient_schedule,
            "cos_bad": cos_bad,
            "weight_before_correction": weight_before_correction,
            "variant": variant,
            "correction_support": correction_support,
            "step_momentum": step_momentum,
            "foreach": foreach,
        }
        self._validate(defaults)
        self.last_stats: CorrectionStats | None = None
        self._scratch: dict[Tensor, Tensor] = {}
        self._support_scratch: dict[Tensor, Tensor] = {}
        super().__init__(params, defaults)

    @classmethod
    def from_preset(cls, params: ParamsT, preset: str, **overrides: Any) -> HeLoCo:
        """``HeLoCo`` with the hyperparameters of ``HELOCO_PRESETS[preset]``, any of them overridden."""
        if preset not in HELOCO_PRESETS:
            raise ValueError(f"preset must be one of {list(HELOCO_PRESETS)}, got {preset!r}")
        return cls(params, **{**HELOCO_PRESETS[preset], **overrides})

    @staticmethod
    def _buffer_in(scratch: dict[Tensor, Tensor], p: Tensor, like: Tensor) -> Tensor:
        """A reusable buffer shaped like ``like`` (kept outside ``state``, so it is neither
        checkpointed nor seen by code that reads the optimizer state)."""
        buf = scratch.get(p)
        if buf is None or buf.shape != like.shape or buf.dtype != like.dtype or buf.device != like.device:
            buf = torch.empty_like(like, memory_format=torch.preserve_format)
            scratch[p] = buf
        return buf

    def _scratch_for(self, p: Tensor, grad: Tensor) -> Tensor:
        """A reusable buffer for p's corrected pseudo-gradient."""
        return self._buffer_in(self._scratch, p, grad)

    def _reference(self, g: _Gathered, staleness: int | None) -> list[Tensor] | None:
        """What the group's correction compares Δ with: ``None`` (the momentum itself) for
        ``correction_support="all"`` or a step that corrects nothing, else m_S = m·1[Δ ≠ 0] in
        reusable buffers (one more momentum-sized buffer, kept only with "nonzero")."""
        group = g.group
        corrects = group["variant"] != "none" and (
            staleness is None or staleness > 0 or group["correct_fresh"]
        )
        if group["correction_support"] == "all" or not corrects:
            return None
        out = []
        for p, d, m in zip(g.params, g.grads, g.momentum_buffers, strict=True):
            buf = self._buffer_in(self._support_scratch, p, m)
            torch.where(d != 0, m, torch.zeros((), dtype=m.dtype, device=m.device), out=buf)
            out.append(buf)
        return out

    @staticmethod
    def _validate(group: Mapping[str, Any]) -> None:
        check_number("lr", group["lr"], 0.0)
        check_number("momentum", group["momentum"], 0.0, 1.0, high_open=True)
        if group["step_momentum"] is not None:
            check_number("step_momentum", group["step_momentum"], 0.0, 1.0, high_open=True)
        validate_correction_hparams(**_correction_kwargs(group), variants=HELOCO_VARIANTS)
        if group["correction_support"] not in CORRECTION_SUPPORTS:
            raise ValueError(
                f"correction_support must be one of {list(CORRECTION_SUPPORTS)}, "
                f"got {group['correction_support']!r}"
            )
        for flag in ("correct_fresh", "weight_before_correction"):
            if not isinstance(group[flag], bool):
                raise ValueError(f"{flag} must be True or False, got {group[flag]!r}")
        _check_foreach(group["foreach"])

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Validate a group's hyperparameters (with the defaults filled in) before adding it."""
        self._validate({**self.defaults, **{k: v for k, v in param_group.items() if k != "params"}})
        super().add_param_group(param_group)

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Also what ``load_state_dict`` calls: the loaded groups are validated before they are set."""
        for group in state.get("param_groups", []):
            self._validate(_group_hparams(group, HELOCO_DEFAULTS))
        super().__setstate__(state)
        self.__dict__.setdefault("last_stats", None)
        self.__dict__.setdefault("_scratch", {})
        self.__dict__.setdefault("_support_scratch", {})
        for group in self.param_groups:
            for key, value in HELOCO_DEFAULTS.items():
                group.setdefault(key, value)
            group.setdefault("foreach", None)

    @torch.no_grad()
    def step(
        self,
        closure: Callable[[], float] | None = None,
        *,
        staleness: int | None = None,
        weight: float | None = None,
    ) -> float | None:
        """One outer step. ``staleness=None`` means unknown and is treated as stale; ``weight`` is the
        arrival weight w (G = w·Δ̂), applied before or after the correction as configured."""
        _check_step_args(staleness, weight)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        # Validate: gather and plan every group's correction (raises on NaN/Inf; nothing changes).
        gathered = [g for g in (_Gathered(self, group) for group in self.param_groups) if g.params]
        references = [self._reference(g, staleness) for g in gathered]
        plans = [
            plan_heloco_correction(
                g.grads,
                g.momentum_buffers if ref is None else ref,
                CorrectionHParams(**_correction_kwargs(g.group)),
                staleness=staleness,
                weight=weight,
                correct_fresh=g.group["correct_fresh"],
                weight_before_correction=g.group["weight_before_correction"],
                foreach=g.foreach,
            )
            for g, ref in zip(gathered, references, strict=True)
        ]
        # Mutate: corrected blocks go to scratch buffers (p.grad is only read), then the update.
        for g, plan, ref in zip(gathered, plans, references, strict=True):
            g.install()
            out = None
            if plan is not None and plan.corrected:
                out = list(g.grads)
                for i in plan.corrected:
                    out[i] = self._scratch_for(g.params[i], g.grads[i])
            heloco_step(
                g.params,
                g.grads,
                g.momentum_buffers,
                plan=plan,
                correction_out=out,
                lr=g.group["lr"],
                momentum=g.group["momentum"],
                step_momentum=g.group["step_momentum"],
                weight=weight,
                foreach=g.foreach,
                reference=ref,
            )
        stats = [plan.stats for plan in plans if plan is not None]
        self.last_stats = CorrectionStats.concat(stats) if stats else None
        return loss


def _correction_kwargs(group: Mapping[str, Any]) -> dict[str, Any]:
    return {f.name: group[f.name] for f in fields(CorrectionHParams)}


class DelayedNesterov(Optimizer):
    """Delayed Nesterov outer optimizer (Liu et al. 2024, arXiv 2401.09135, Algorithm 3).

    Asynchronous arrivals are buffered and the momentum is only updated every N arrivals, so it does
    not decay N times faster than in synchronous DiLoCo. On each arrival g (``weight``·``p.grad``),
    with the per-parameter arrival counter t (before this arrival), β = momentum, c = activation::

        D ← D + g
        if (t + 1) mod N == 0:  m ← β·m + D/N;  θ ← θ − η·[(1 − c·N + c)·β·m + g/N];  D ← 0
        else:                   θ ← θ − η·[c·β·m + g/N]

    With c = 0, N arrivals of the same g move θ exactly like one torch Nesterov step on g. State per
    parameter: ``momentum_buffer`` (m), ``delay_buffer`` (D) and ``step`` (the arrival counter, an int).
    ``staleness`` is accepted for a uniform interface and ignored; ``last_stats`` is always None.
    """

    last_stats: CorrectionStats | None = None

    def __init__(
        self,
        params: ParamsT,
        lr: float = DELAYED_NESTEROV_DEFAULTS["lr"],
        momentum: float = DELAYED_NESTEROV_DEFAULTS["momentum"],
        buffer_size: int = DELAYED_NESTEROV_DEFAULTS["buffer_size"],
        activation: float = DELAYED_NESTEROV_DEFAULTS["activation"],
        foreach: bool | None = None,
    ) -> None:
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "buffer_size": buffer_size,
            "activation": activation,
            "foreach": foreach,
        }
        self._validate(defaults)
        super().__init__(params, defaults)

    @staticmethod
    def _validate(group: Mapping[str, Any]) -> None:
        check_number("lr", group["lr"], 0.0)
        check_number("momentum", group["momentum"], 0.0, 1.0, high_open=True)
        n = group["buffer_size"]
        if not is_int(n) or n < 1:
            raise ValueError(f"buffer_size must be an int >= 1, got {n!r}")
        check_number("activation", group["activation"], 0.0, 1.0 / n, high_open=False)
        _check_foreach(group["foreach"])

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Validate a group's hyperparameters (with the defaults filled in) before adding it."""
        self._validate({**self.defaults, **{k: v for k, v in param_group.items() if k != "params"}})
        super().add_param_group(param_group)

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Also what ``load_state_dict`` calls: the loaded groups are validated before they are set."""
        for group in state.get("param_groups", []):
            self._validate(_group_hparams(group, DELAYED_NESTEROV_DEFAULTS))
        super().__setstate__(state)
        for group in self.param_groups:
            for key, value in DELAYED_NESTEROV_DEFAULTS.items():
                group.setdefault(key, value)
            group.setdefault("foreach", None)

    def _gather(self, group: dict[str, Any]) -> tuple[_Gathered, list[Tensor], list[bool]]:
        """A group's tensors, delay buffers and which of them this arrival flushes (nothing changes)."""
        g = _Gathered(self, group)
        dbufs, flush = [], []
        for p in g.params:
            state = self.state.get(p, {})
            if "delay_buffer" not in state:
                d = torch.zeros_like(p, memory_format=torch.preserve_format)
                state = g.add_state(p, delay_buffer=d, step=0)
            dbufs.append(state["delay_buffer"])
            flush.append((state["step"] + 1) % group["buffer_size"] == 0)
        return g, dbufs, flush

    @torch.no_grad()
    def step(
        self,
        closure: Callable[[], float] | None = None,
        *,
        staleness: int | None = None,
        weight: float | None = None,
    ) -> float | None:
        """Register one arrival (Δ in ``p.grad``); ``staleness`` is ignored."""
        _check_step_args(staleness, weight)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        # Validate every group (sparse gradients) before any changes.
        gathered = [t for t in (self._gather(group) for group in self.param_groups) if t[0].params]
        for g, dbufs, flush in gathered:
            g.install()
            for p in g.params:
                self.state[p]["step"] += 1
            group = g.group
            delayed_nesterov_step(
                g.params,
                g.grads,
                g.momentum_buffers,
                dbufs,
                flush,
                lr=group["lr"],
                momentum=group["momentum"],
                buffer_size=group["buffer_size"],
                activation=group["activation"],
                weight=weight,
                foreach=g.foreach,
            )
        return loss
