"""Outer optimizers for DiLoCo-style training, as ordinary ``torch.optim.Optimizer`` subclasses.

The pseudo-gradient Δ = θ_global − θ_local is read from ``p.grad`` (parameters without a grad are
skipped), so these work wherever a torch optimizer is expected (LR schedulers, checkpointing, other
DiLoCo wrappers). The outer momentum lives in ``state[p]["momentum_buffer"]`` as in ``torch.optim.SGD``.
``step`` takes two optional keyword arguments from an asynchronous server: ``staleness`` (τ of the
submitted Δ, ``None`` = unknown) and ``weight`` (a scalar the update is multiplied by).

``foreach=None`` selects the ``torch._foreach_*`` path on every device: on CPU those ops run the same
per-tensor kernels in one C++ loop, which saves Python overhead, and on accelerators they are fused.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from numbers import Integral
from types import MappingProxyType
from typing import Any

import torch
from torch import Tensor
from torch.optim.optimizer import Optimizer, ParamsT

from heloco.correction import (
    CorrectionStats,
    apply_correction,
    check_number,
    plan_correction,
    validate_correction_hparams,
)

__all__ = [
    "DELAYED_NESTEROV_DEFAULTS",
    "HELOCO_DEFAULTS",
    "HELOCO_PRESETS",
    "HELOCO_VARIANTS",
    "DelayedNesterov",
    "HeLoCo",
]

# The single place where HeLoCo's default hyperparameters live: the authors' reference values (their
# "Table 3" in the experiment code of arXiv 2606.00271): c_ok 0.2, k_s 0.5, β_max 0.5, k_d 1, κ 3,
# μ 0.9, η 0.7, the normalised reorientation schedule with cos_bad = −0.2, every arrival corrected,
# and the arrival weight applied before the correction.
HELOCO_DEFAULTS: Mapping[str, Any] = MappingProxyType(
    {
        "lr": 0.7,
        "momentum": 0.9,
        "keep_threshold": 0.2,
        "shrink_strength": 0.5,
        "shrink_max": 0.5,
        "reorient_strength": 1.0,
        "kappa": 3.0,
        "eps": 1e-8,
        "correct_fresh": True,
        "reorient_schedule": "normalized",
        "cos_bad": -0.2,
        "weight_before_correction": True,
        "variant": "full",
    }
)

# Named hyperparameter sets. "reference" = HELOCO_DEFAULTS. "tiny_sweep" is ours, not the paper's:
# the values our sweeps chose on the 3M-parameter model, severe speeds, 80%-one-language shards
# (docs/results.md §1): only blocks with a negative cosine are corrected, stale arrivals only, the
# printed reorientation schedule (unused at c_ok = 0), η 0.175, and no arrival weight was used there.
HELOCO_PRESETS: Mapping[str, Mapping[str, Any]] = MappingProxyType(
    {
        "reference": HELOCO_DEFAULTS,
        "tiny_sweep": MappingProxyType(
            {
                **HELOCO_DEFAULTS,
                "lr": 0.175,
                "keep_threshold": 0.0,
                "shrink_strength": 2.0,
                "shrink_max": 1.0,
                "reorient_strength": 0.5,
                "kappa": 1.0,
                "correct_fresh": False,
                "reorient_schedule": "printed",
                "weight_before_correction": False,
            }
        ),
    }
)
HELOCO_VARIANTS = ("full", "project", "none")

DELAYED_NESTEROV_DEFAULTS: Mapping[str, Any] = MappingProxyType(
    {"lr": 0.7, "momentum": 0.9, "buffer_size": 1, "activation": 0.0}
)


def _check_foreach(foreach: object) -> None:
    if foreach is not None and not isinstance(foreach, bool):
        raise ValueError(f"foreach must be None, True or False, got {foreach!r}")


def _check_step_args(staleness: int | None, weight: float | None) -> None:
    if staleness is not None and (
        not isinstance(staleness, Integral) or isinstance(staleness, bool) or staleness < 0
    ):
        raise ValueError(f"staleness must be None or an int >= 0, got {staleness!r}")
    if weight is not None:
        check_number("weight", weight, 0.0)


def _collect(opt: Optimizer, group: dict[str, Any]) -> tuple[list[Tensor], list[Tensor]]:
    params, grads = [], []
    for p in group["params"]:
        if p.grad is None:
            continue
        if p.grad.is_sparse:
            raise ValueError(f"{type(opt).__name__} does not support sparse gradients")
        params.append(p)
        grads.append(p.grad)
    return params, grads


def _momentum_buffers(opt: Optimizer, params: list[Tensor]) -> list[Tensor]:
    bufs = []
    for p in params:
        state = opt.state[p]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        bufs.append(state["momentum_buffer"])
    return bufs


class HeLoCo(Optimizer):
    """EMA-form Nesterov outer step with HeLoCo's pseudo-gradient correction (arXiv 2606.00271).

    Per step, with Δ from ``p.grad`` and w the optional arrival ``weight``: Δ is corrected block by
    block against the current momentum m (see :mod:`heloco.correction`) unless ``variant="none"``,
    or the arrival is fresh (``staleness=0``) and ``correct_fresh=False``. With
    ``weight_before_correction`` the correction sees wΔ (w enters its confidence), as in the
    authors' experiments; otherwise it sees Δ and w scales the result. Then, with G = w·Δ̂::

        m ← μ·m + (1 − μ)·G
        θ ← θ − η·(G + μ·m)

    ``HeLoCo(params)`` is the authors' method with their values (``HELOCO_DEFAULTS``);
    ``HeLoCo.from_preset(params, "tiny_sweep")`` gives our swept values (``HELOCO_PRESETS``).
    ``p.grad`` is never modified: corrected blocks go to per-parameter scratch buffers that are
    reused across steps and are not part of ``state_dict``. m starts at zero, so the first update is
    never corrected. ``last_stats`` holds the :class:`~heloco.correction.CorrectionStats` of the latest
    step, or None if nothing was corrected.
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
            "foreach": foreach,
        }
        self._validate(defaults)
        self.last_stats: CorrectionStats | None = None
        self._scratch: dict[Tensor, Tensor] = {}
        super().__init__(params, defaults)

    @classmethod
    def from_preset(cls, params: ParamsT, preset: str, **overrides: Any) -> HeLoCo:
        """``HeLoCo`` with the hyperparameters of ``HELOCO_PRESETS[preset]``, any of them overridden."""
        if preset not in HELOCO_PRESETS:
            raise ValueError(f"preset must be one of {list(HELOCO_PRESETS)}, got {preset!r}")
        return cls(params, **{**HELOCO_PRESETS[preset], **overrides})

    def _scratch_for(self, p: Tensor, grad: Tensor) -> Tensor:
        """A reusable buffer for p's corrected pseudo-gradient (kept outside ``state``, so it is
        neither checkpointed nor seen by code that reads the optimizer state)."""
        buf = self._scratch.get(p)
        if buf is None or buf.shape != grad.shape or buf.dtype != grad.dtype or buf.device != grad.device:
            buf = torch.empty_like(grad, memory_format=torch.preserve_format)
            self._scratch[p] = buf
        return buf

    @staticmethod
    def _validate(group: Mapping[str, Any]) -> None:
        check_number("lr", group["lr"], 0.0)
        check_number("momentum", group["momentum"], 0.0, 1.0, high_open=True)
        validate_correction_hparams(
            keep_threshold=group["keep_threshold"],
            shrink_strength=group["shrink_strength"],
            shrink_max=group["shrink_max"],
            reorient_strength=group["reorient_strength"],
            kappa=group["kappa"],
            eps=group["eps"],
            variant=group["variant"],
            reorient_schedule=group["reorient_schedule"],
            cos_bad=group["cos_bad"],
            variants=HELOCO_VARIANTS,
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
        super().__setstate__(state)
        self.__dict__.setdefault("last_stats", None)
        self.__dict__.setdefault("_scratch", {})
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

        # Phase 1: measure and plan every group's correction (may raise on NaN/Inf; nothing changes).
        plans = []
        for group in self.param_groups:
            params, grads = _collect(self, group)
            if not params:
                continue
            bufs = _momentum_buffers(self, params)
            foreach = group["foreach"] is not False
            plan = None
            if group["variant"] != "none" and (staleness is None or staleness > 0 or group["correct_fresh"]):
                w_in = 1.0 if weight is None or not group["weight_before_correction"] else weight
                plan = plan_correction(
                    grads,
                    bufs,
                    keep_threshold=group["keep_threshold"],
                    shrink_strength=group["shrink_strength"],
                    shrink_max=group["shrink_max"],
                    reorient_strength=group["reorient_strength"],
                    kappa=group["kappa"],
                    eps=group["eps"],
                    variant=group["variant"],
                    reorient_schedule=group["reorient_schedule"],
                    cos_bad=group["cos_bad"],
                    confidence_scale=w_in,
                    foreach=foreach,
                )
            plans.append((group, params, grads, bufs, foreach, plan))

        # Phase 2: G = weight·Δ̂ (corrected blocks written to scratch buffers, p.grad is only read),
        # then the EMA-form Nesterov update.
        for group, params, grads, bufs, foreach, plan in plans:
            updates = grads
            if plan is not None and plan.corrected:
                out = list(grads)
                for i in plan.corrected:
                    out[i] = self._scratch_for(params[i], grads[i])
                updates = apply_correction(plan, grads, bufs, out=out, foreach=foreach)
            lr, mu = group["lr"], group["momentum"]
            w = 1.0 if weight is None else weight
            if foreach:
                if weight is None:
                    torch._foreach_lerp_(bufs, updates, 1.0 - mu)
                else:
                    torch._foreach_mul_(bufs, mu)
                    torch._foreach_add_(bufs, updates, alpha=(1.0 - mu) * w)
                torch._foreach_add_(params, updates, alpha=-lr * w)
                torch._foreach_add_(params, bufs, alpha=-lr * mu)
            else:
                for p, g, m in zip(params, updates, bufs, strict=True):
                    if weight is None:
                        m.lerp_(g, 1.0 - mu)
                    else:
                        m.mul_(mu).add_(g, alpha=(1.0 - mu) * w)
                    p.add_(g, alpha=-lr * w)
                    p.add_(m, alpha=-lr * mu)
        stats = [plan.stats for *_, plan in plans if plan is not None]
        self.last_stats = CorrectionStats.concat(stats) if stats else None
        return loss


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
    ``staleness`` is accepted for a uniform interface and ignored.
    """

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
        if not isinstance(n, Integral) or isinstance(n, bool) or n < 1:
            raise ValueError(f"buffer_size must be an int >= 1, got {n!r}")
        check_number("activation", group["activation"], 0.0, 1.0 / n, high_open=False)
        _check_foreach(group["foreach"])

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Validate a group's hyperparameters (with the defaults filled in) before adding it."""
        self._validate({**self.defaults, **{k: v for k, v in param_group.items() if k != "params"}})
        super().add_param_group(param_group)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            for key, value in DELAYED_NESTEROV_DEFAULTS.items():
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
        """Register one arrival (Δ in ``p.grad``); ``staleness`` is ignored."""
        _check_step_args(staleness, weight)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        for group in self.param_groups:
            params, grads = _collect(self, group)
            if not params:
                continue
            lr, beta, n, c = group["lr"], group["momentum"], group["buffer_size"], group["activation"]
            foreach = group["foreach"] is not False
            mbufs = _momentum_buffers(self, params)
            dbufs, flush = [], []
            for p in params:
                state = self.state[p]
                if "delay_buffer" not in state:
                    state["delay_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["step"] = 0
                dbufs.append(state["delay_buffer"])
                flush.append((state["step"] + 1) % n == 0)
                state["step"] += 1
            if weight is not None:
                grads = torch._foreach_mul(grads, weight) if foreach else [g.mul(weight) for g in grads]

            f_idx = [i for i, f in enumerate(flush) if f]
            h_idx = [i for i, f in enumerate(flush) if not f]
            if foreach:
                torch._foreach_add_(dbufs, grads)
                if f_idx:
                    p_f, g_f = [params[i] for i in f_idx], [grads[i] for i in f_idx]
                    m_f, d_f = [mbufs[i] for i in f_idx], [dbufs[i] for i in f_idx]
                    torch._foreach_mul_(m_f, beta)
                    torch._foreach_add_(m_f, d_f, alpha=1.0 / n)
                    torch._foreach_add_(p_f, m_f, alpha=-lr * (1.0 - c * n + c) * beta)
                    torch._foreach_add_(p_f, g_f, alpha=-lr / n)
                    torch._foreach_zero_(d_f)
                if h_idx:
                    p_h, g_h = [params[i] for i in h_idx], [grads[i] for i in h_idx]
                    if c != 0.0:
                        torch._foreach_add_(p_h, [mbufs[i] for i in h_idx], alpha=-lr * c * beta)
                    torch._foreach_add_(p_h, g_h, alpha=-lr / n)
            else:
                for i, (p, g, m, d) in enumerate(zip(params, grads, mbufs, dbufs, strict=True)):
                    d.add_(g)
                    if flush[i]:
                        m.mul_(beta).add_(d, alpha=1.0 / n)
                        p.add_(m, alpha=-lr * (1.0 - c * n + c) * beta)
                        p.add_(g, alpha=-lr / n)
                        d.zero_()
                    else:
                        if c != 0.0:
                            p.add_(m, alpha=-lr * c * beta)
                        p.add_(g, alpha=-lr / n)
        return loss
