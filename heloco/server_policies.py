"""Optional server policies of ``AsyncAggregator`` (ours, each after a published idea): how much each
worker's Δ counts, a memory of every worker's latest Δ, and compensation of a stale Δ for the drift
of the global model since it was dispatched. All three are off by default.

With K workers, Δ_k worker k's pseudo-gradient and w its usual weight (staleness weight × ρ):

* ``worker_weighting="rate"`` (Rescaled ASGD, arXiv 2605.13434: plain asynchronous SGD weights each
  worker's objective by how often it arrives; scaling a worker's step by its compute time gives every
  objective the same weight per unit of time). With p_k worker k's share of the arrivals and α the
  ``worker_weighting_power``, Δ_k is multiplied by

      w_k = p_k^(−α) / Σ_{j: p_j > 0} p_j^(1−α)

  so that the mean weight per arrival, Σ_k p_k·w_k, is 1 (α = 1: w_k = 1 / (p_k·K'), K' workers with
  p_j > 0; α = 0: w_k = 1). p_k is declared, r_k / Σ_j r_j from ``worker_rates`` (arrivals per unit of
  time, e.g. speed_k / H_k), or observed, n_k / Σ_j n_j from the submissions counted so far, this one
  included (the counts are the aggregator's worker records, so they are checkpointed with them).
* ``memory="latest"`` (MIFA, Gu et al., NeurIPS 2021, "Fast Federated Learning in the Presence of
  Arbitrary Device Unavailability"): the server keeps every worker's latest weighted Δ and each outer
  step is on their mean over the workers S seen so far, worker k's entry replaced by its new one:

      M_k ← w·Δ_k;   p.grad = (1/|S|)·Σ_{j∈S} M_j

  MIFA divides by all N devices after a first round in which every one has reported; here the mean
  starts with the first arrival. A slow worker's Δ thus enters every step until it is replaced, which
  gives each worker's objective the same weight per step whatever its speed. Quorum 1 only. Every
  entry is pre-scaled by its own weight, so a staleness-aware optimizer gets no ``weight`` keyword.
* ``drift_compensation=λ`` (DC-ASGD, Zheng et al., ICML 2017, arXiv 1609.08326; on pseudo-gradients
  as in CoCoDC, arXiv 2504.17672): a first-order Taylor correction of Δ_k to the current model, with
  the diagonal outer product λ·Δ⊙Δ standing in for the Hessian,

      Δ̃_k = Δ_k + λ·Δ_k⊙Δ_k⊙(θ_now − θ_base)

  where θ_base is exactly the point worker k was handed (θ, or its look-ahead point), kept by the
  server. λ·Δ⊙Δ stands for the diagonal of the Jacobian J = ∂Δ/∂θ_start; for a pseudo-gradient its
  scale follows the inner learning rate, so the useful λ does too. ``drift_normalization="max"``
  (ours) divides Δ⊙Δ by its largest entry in each tensor, so that diag J ∈ [0, λ] (J = 1: the
  worker would have ended at the same point from θ_now, J = 0: Δ does not depend on its start):

      Δ̃_k = Δ_k + λ·(Δ_k⊙Δ_k / max(Δ_k⊙Δ_k))⊙(θ_now − θ_base)

  Applied before any weighting; a compensated Δ that is not finite is refused like a bad one.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from heloco.validation import check_finite, check_number, check_tensor_list, is_int

__all__ = [
    "DRIFT_NORMALIZATIONS",
    "MEMORIES",
    "WORKER_WEIGHTINGS",
    "ServerPolicies",
    "check_policy_settings",
    "rate_weight",
]

WORKER_WEIGHTINGS = (None, "rate")
MEMORIES = (None, "latest")
DRIFT_NORMALIZATIONS = ("none", "max")


def rate_weight(shares: Sequence[float], worker_id: int, power: float = 1.0) -> float:
    """w_k = p_k^(−α) / Σ_{j: p_j > 0} p_j^(1−α) for worker k = ``worker_id`` (p: ``shares``, summing
    to 1, p_k > 0; α: ``power``)."""
    denominator = math.fsum(p ** (1.0 - power) for p in shares if p > 0)
    return shares[worker_id] ** (-power) / denominator


def check_policy_settings(
    num_workers: int,
    quorum: int,
    worker_weighting: Any,
    worker_rates: Any,
    worker_weighting_power: Any,
    memory: Any,
    drift_compensation: Any,
    drift_normalization: Any,
) -> None:
    """The policies' constructor settings (``worker_weighting`` and ``memory`` already mapped from
    ``"none"`` to ``None``); raises ValueError naming the argument and the accepted values."""
    if worker_weighting not in WORKER_WEIGHTINGS:
        raise ValueError(f"worker_weighting must be one of {WORKER_WEIGHTINGS}, got {worker_weighting!r}")
    if worker_rates is not None:
        if worker_weighting != "rate":
            raise ValueError("worker_rates is only read with worker_weighting='rate'; pass None")
        rates = list(worker_rates) if isinstance(worker_rates, Sequence) else None
        if rates is None or len(rates) != num_workers:
            raise ValueError(
                f"worker_rates must be None or a sequence of num_workers={num_workers} arrival rates > 0, "
                f"got {worker_rates!r}"
            )
        for i, r in enumerate(rates):
            check_number(f"worker_rates[{i}]", r, 0.0)
            if r == 0:
                raise ValueError(f"worker_rates[{i}] must be > 0, got {r!r}")
    check_number("worker_weighting_power", worker_weighting_power, 0.0)
    if memory not in MEMORIES:
        raise ValueError(f"memory must be one of {MEMORIES}, got {memory!r}")
    if memory is not None and quorum != 1:
        raise ValueError(
            f"memory={memory!r} needs quorum=1 (every arrival is an outer step), got quorum={quorum}"
        )
    check_number("drift_compensation", drift_compensation, 0.0)
    if drift_normalization not in DRIFT_NORMALIZATIONS:
        raise ValueError(
            f"drift_normalization must be one of {DRIFT_NORMALIZATIONS}, got {drift_normalization!r}"
        )


def _clones(tensors: Sequence[Tensor], like: Sequence[Tensor]) -> list[Tensor]:
    """Copies of ``tensors`` in the dtype and on the device of ``like``."""
    out = [torch.empty_like(p) for p in like]
    torch._foreach_copy_(out, list(tensors))
    return out


class ServerPolicies:
    """The policies' settings, state and arithmetic for one aggregator (called under its lock).

    ``masters``: the aggregator's master tensors. Validate, then mutate: ``check_submission`` raises
    before anything changes; the memory entry of a submission is written (``commit``) only after
    its outer step returned.
    """

    def __init__(
        self,
        masters: Sequence[Tensor],
        num_workers: int,
        quorum: int,
        worker_weighting: str | None = None,
        worker_rates: Sequence[float] | None = None,
        worker_weighting_power: float = 1.0,
        memory: str | None = None,
        drift_compensation: float = 0.0,
        drift_normalization: str = "none",
    ) -> None:
        worker_weighting = None if worker_weighting == "none" else worker_weighting
        memory = None if memory == "none" else memory
        check_policy_settings(
            num_workers,
            quorum,
            worker_weighting,
            worker_rates,
            worker_weighting_power,
            memory,
            drift_compensation,
            drift_normalization,
        )
        self.masters = list(masters)
        self.num_workers = num_workers
        self.worker_weighting = worker_weighting
        self.worker_rates = None if worker_rates is None else [float(r) for r in worker_rates]
        self.worker_weighting_power = float(worker_weighting_power)
        self.memory = memory
        self.drift_compensation = float(drift_compensation)
        self.drift_normalization = drift_normalization
        self.slots: list[list[Tensor] | None] = [None] * num_workers  # memory: M_k
        self.bases: list[list[Tensor] | None] = [None] * num_workers  # drift: θ_base of each worker
        self.base_versions: list[int | None] = [None] * num_workers
        self._mean: list[Tensor] | None = None  # memory: the step's p.grad
        self._drift: list[Tensor] | None = None  # drift: scratch

    @property
    def keeps_bases(self) -> bool:
        return self.drift_compensation > 0.0

    # -- validating --------------------------------------------------------------------------------
    def check_submission(self, worker_id: int, base_version: int) -> None:
        """With drift compensation, Δ must start from the point this server last handed the worker."""
        if not self.keeps_bases:
            return
        have = self.base_versions[worker_id]
        if have is None:
            raise ValueError(
                f"drift_compensation needs worker {worker_id} to dispatch before it submits "
                "(the server compensates from the parameters it handed out)"
            )
        if have != base_version:
            raise ValueError(
                f"drift_compensation: worker {worker_id} was last handed version {have}, "
                f"its Δ says base_version {base_version}"
            )

    # -- the arithmetic ----------------------------------------------------------------------------
    def worker_weight(self, worker_id: int, counts: Sequence[int], stats: dict[str, float]) -> float:
        """w_k of ``worker_weighting`` (1.0 when off; else also ``stats["worker_weight"]``);
        ``counts``: every worker's submissions so far, this one not yet included."""
        if self.worker_weighting is None:
            return 1.0
        if self.worker_rates is not None:
            total = math.fsum(self.worker_rates)
            shares = [r / total for r in self.worker_rates]
        else:
            n = list(counts)
            n[worker_id] += 1
            total = sum(n)
            shares = [c / total for c in n]
        stats["worker_weight"] = rate_weight(shares, worker_id, self.worker_weighting_power)
        return stats["worker_weight"]

    def compensate(self, worker_id: int, delta: list[Tensor], stats: dict[str, float]) -> None:
        """Δ ← Δ + λ·Δ⊙Δ⊙(θ_now − θ_base), in place (nothing when λ = 0); raises ValueError if the
        result is not finite (before anything but the caller's scratch ``delta`` changed)."""
        if not self.keeps_bases:
            return
        base = self.bases[worker_id]
        assert base is not None  # check_submission
        if self._drift is None:
            self._drift = [torch.empty_like(p) for p in self.masters]
        lam = self.drift_compensation
        sq_delta, sq_corr = [], []
        for d, p, b, s in zip(delta, self.masters, base, self._drift, strict=True):
            torch.sub(p.detach(), b, out=s)
            s.mul_(d).mul_(d)
            if self.drift_normalization == "max":
                s.mul_(lam / d.abs().amax().square().clamp_min(torch.finfo(d.dtype).tiny))
            else:
                s.mul_(lam)
            sq_delta.append(d.square().sum())
            sq_corr.append(s.square().sum())
            d.add_(s)
        check_finite(delta, "drift-compensated pseudo_grads")
        norm = float(torch.stack(sq_delta).sum().sqrt())
        stats["drift/relative_norm"] = float(torch.stack(sq_corr).sum().sqrt()) / norm if norm else 0.0

    def step_grads(self, worker_id: int, delta: list[Tensor], stats: dict[str, float]) -> list[Tensor]:
        """The step's p.grad: ``delta`` itself, or with the memory (1/|S|)·Σ_{j∈S} M_j with
        M_k = ``delta`` (the memory is not changed here)."""
        if self.memory is None:
            return delta
        if self._mean is None:
            self._mean = [torch.empty_like(p) for p in self.masters]
        n = 0
        for j in range(self.num_workers):
            src = delta if j == worker_id else self.slots[j]
            if src is None:
                continue
            if n == 0:
                torch._foreach_copy_(self._mean, src)
            else:
                torch._foreach_add_(self._mean, src)
            n += 1
        if n > 1:
            torch._foreach_div_(self._mean, float(n))
        stats["memory_workers"] = float(n)
        return self._mean

    def commit(self, worker_id: int, delta: list[Tensor]) -> None:
        """After the outer step returned: M_k ← ``delta`` (nothing without the memory)."""
        if self.memory is None:
            return
        slot = self.slots[worker_id]
        if slot is None:
            self.slots[worker_id] = _clones(delta, self.masters)
        else:
            torch._foreach_copy_(slot, delta)

    def dispatched(
        self,
        worker_id: int,
        version: int,
        write: Callable[[list[Tensor] | None], list[Tensor]],
        dest: list[Tensor] | None,
    ) -> list[Tensor]:
        """The point handed to ``worker_id``: ``write(dest)`` (into ``dest``, or new tensors for
        ``None``). With drift compensation it is first written into the worker's kept base (of
        ``version``, in the masters' dtype) and copied from there."""
        if not self.keeps_bases:
            return write(dest)
        base = self.bases[worker_id]
        if base is None:
            base = self.bases[worker_id] = [torch.empty_like(p) for p in self.masters]
        self.base_versions[worker_id] = version
        write(base)
        if dest is None:
            return [b.clone() for b in base]
        torch._foreach_copy_(dest, base)
        return dest

    # -- checkpointing -----------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        """The aggregator ``state_dict`` entries of the policies that are on (copies)."""
        out: dict[str, Any] = {}
        if self.memory is not None:
            out["memory"] = [None if s is None else [t.detach().clone() for t in s] for s in self.slots]
        if self.keeps_bases:
            out["drift_bases"] = {
                "versions": list(self.base_versions),
                "params": [None if b is None else [t.detach().clone() for t in b] for b in self.bases],
            }
        return out

    def parse_state(self, sd: dict[str, Any], version: int) -> dict[str, Any]:
        """Validate those entries of an aggregator ``state_dict``; changes nothing."""
        parsed: dict[str, Any] = {}
        if self.memory is not None:
            parsed["memory"] = self._parse_lists(sd, "memory", sd.get("memory"))
        if self.keeps_bases:
            entry = sd.get("drift_bases")
            if not isinstance(entry, dict) or set(entry) != {"versions", "params"}:
                raise ValueError(
                    "state_dict has no 'drift_bases' entry with 'versions' and 'params' "
                    "(saved without drift_compensation); it cannot resume with drift_compensation > 0"
                )
            bases = self._parse_lists(sd, "drift_bases']['params", entry["params"])
            versions = list(entry["versions"])
            if len(versions) != self.num_workers:
                raise ValueError(
                    f"state_dict['drift_bases']['versions'] must have {self.num_workers} entries"
                )
            for i, (v, b) in enumerate(zip(versions, bases, strict=True)):
                ok = (v is None and b is None) or (b is not None and is_int(v) and 0 <= v <= version)
                if not ok:
                    raise ValueError(
                        f"state_dict['drift_bases']['versions'][{i}]={v!r} must be an int in "
                        f"[0, {version}] where a base is saved and None where none is"
                    )
            parsed["drift_bases"] = (versions, bases)
        return parsed

    def _parse_lists(self, sd: dict[str, Any], key: str, entry: Any) -> list[list[Tensor] | None]:
        if not isinstance(entry, list) or len(entry) != self.num_workers:
            option = "memory='latest'" if key == "memory" else "drift_compensation > 0"
            raise ValueError(
                f"state_dict['{key}'] must be a list of {self.num_workers} entries (None or a tensor "
                f"list) for {option}; got {type(entry).__name__}"
            )
        return [
            None if e is None else check_tensor_list(e, self.masters, f"state_dict['{key}'][{i}]")
            for i, e in enumerate(entry)
        ]

    def restore(self, parsed: dict[str, Any]) -> None:
        """Install what ``parse_state`` returned."""
        if "memory" in parsed:
            self.slots = [None if e is None else _clones(e, self.masters) for e in parsed["memory"]]
        if "drift_bases" in parsed:
            versions, bases = parsed["drift_bases"]
            self.base_versions = [None if v is None else int(v) for v in versions]
            self.bases = [None if b is None else _clones(b, self.masters) for b in bases]
