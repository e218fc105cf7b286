"""The parameter server's logic, independent of how messages travel.

``AsyncAggregator`` owns the fp32 master parameters and the outer optimizer built over them. Workers
``dispatch`` to get parameters and their version, train for a round, and ``submit`` their
pseudo-gradient Δ = start − end together with the version they started from. The aggregator measures
the staleness τ = current version − base version, optionally down-weights (polynomial or hinge, Liu et
al. 2024, arXiv 2401.09135) or drops stale Δ, gathers a quorum of q submissions (q = 1: asynchronous
DiLoCo; q = K: synchronous DiLoCo, Douillard et al. 2023, arXiv 2311.08105), writes their mean into
``p.grad`` of the masters and runs one outer step. Every Δ can also be scaled by a constant arrival
weight ρ (the HeLoCo authors use ρ = 1/√K for every asynchronous method). Optionally it hands out
momentum look-ahead points instead of the plain parameters (``dispatch``).

A synchronous run whose worker is gone for good goes on with the others: ``remove_worker`` lowers
the effective quorum to the live workers and completes an open round that now has enough
submissions. ``dispatch``/``submit`` may write the answered parameters into caller-given tensors
(``out=``, e.g. a transport's reply buffer) instead of allocating copies.

Every public method holds one lock, so transports may call it from several threads. A bad submission
raises ``ValueError`` before anything is mutated, and an exception inside the outer step restores the
parameters and the optimizer state, so the global model is never left half-updated.
"""

from __future__ import annotations

import copy
import inspect
import math
import numbers
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

__all__ = ["DISPATCHES", "WEIGHTINGS", "AsyncAggregator", "Update", "staleness_weight"]

WEIGHTINGS = (None, "poly", "hinge")
DISPATCHES = ("plain", "lookahead", "scaled_lookahead")


@dataclass
class Update:
    """What the server answers to ``dispatch`` and ``submit``."""

    params: list[Tensor] | None  # parameters the worker loads next; None while a quorum is pending
    version: int  # version of ``params``: the base version of the worker's next round
    staleness: int = 0  # τ of the submitted Δ (0 for dispatch)
    applied: bool = False  # an outer step ran during this call
    dropped: bool = False  # Δ discarded because τ > max_staleness
    weight: float = 1.0  # staleness weight used (0.0 when dropped)
    released: list[int] = field(default_factory=list)  # other workers of a quorum that just completed
    stats: dict[str, float] = field(default_factory=dict)  # staleness, weight, correction/*, for logging


def staleness_weight(staleness: int, weighting: str | None, a: float = 0.5, b: float = 4) -> float:
    """Weight s(τ) of a Δ with staleness τ (Liu et al. 2024, arXiv 2401.09135).

    ``None``: 1.  ``"poly"``: (1 + τ)^(−a).  ``"hinge"``: 1 if τ ≤ b else 1 / (a(τ − b) + 1).
    """
    if weighting is None:
        return 1.0
    if weighting == "poly":
        return float((1.0 + staleness) ** (-a))
    if weighting == "hinge":
        return 1.0 if staleness <= b else 1.0 / (a * (staleness - b) + 1.0)
    raise ValueError(f"staleness_weighting must be one of {WEIGHTINGS}, got {weighting!r}")


def _is_int(x: Any) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _accepts_keyword(fn: Any, name: str) -> bool:
    """Whether ``fn`` has a parameter called ``name`` (``**kwargs`` does not count: it may drop it)."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    p = params.get(name)
    return p is not None and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)


@dataclass
class _WorkerRecord:
    base_version: int | None = None  # version of the parameters last handed to the worker
    submissions: int = 0  # every observed submission, dropped ones included
    dropped: int = 0
    staleness_sum: int = 0
    staleness_max: int | None = None
    staleness_last: int | None = None

    @property
    def staleness_mean(self) -> float:
        """τ̂: the running mean of the worker's observed staleness (0 before its first submission)."""
        return self.staleness_sum / self.submissions if self.submissions else 0.0

    def observe(self, tau: int, dropped: bool) -> None:
        self.submissions += 1
        self.dropped += int(dropped)
        self.staleness_sum += tau
        self.staleness_max = tau if self.staleness_max is None else max(self.staleness_max, tau)
        self.staleness_last = tau

    def as_dict(self) -> dict[str, Any]:
        return {
            "base_version": self.base_version,
            "submissions": self.submissions,
            "dropped": self.dropped,
            "staleness_sum": self.staleness_sum,
            "staleness_max": self.staleness_max,
            "staleness_last": self.staleness_last,
        }


class AsyncAggregator:
    """Versions, staleness, weighting/dropping, quorum and look-ahead around one outer optimizer.

    Args:
        global_params: the fp32 master tensors, exactly those in ``outer_optimizer.param_groups``
            (any order; this order is the order of every tensor list exchanged with workers). They
            may live on another device than the workers; Δ is converted on arrival.
        outer_optimizer: any ``torch.optim.Optimizer`` reading Δ from ``p.grad``. If its ``step``
            has a ``staleness`` keyword it gets τ (the largest τ of the round when q > 1). If it
            has a ``weight`` keyword and q = 1 it gets the staleness weight and Δ is not
            pre-scaled (``weight`` is omitted when no weighting is configured); otherwise Δ is
            pre-scaled by its weight before averaging.
        num_workers: K, worker ids are ``0 .. K-1``.
        quorum: q submissions from distinct workers are averaged into one outer step; 1 is
            asynchronous DiLoCo, K is synchronous DiLoCo.
        staleness_weighting: ``None``, ``"poly"`` or ``"hinge"`` (see ``staleness_weight``).
        staleness_a, staleness_b: the a and b of those weightings.
        max_staleness: drop a Δ whose τ exceeds it (``None``: never drop).
        arrival_weight: a constant ρ > 0 every Δ is multiplied by (times its staleness weight);
            ``None`` is 1. An outer optimizer with a ``weight`` keyword gets it there (HeLoCo can
            then apply it before its correction); otherwise Δ is pre-scaled.
        dispatch: which parameters a worker starts from (see ``dispatch``): ``"plain"`` θ,
            ``"lookahead"`` θ − η·μ·m (HeLoCo's), ``"scaled_lookahead"`` θ − η·τ̂_i·μ·m (ours).
        lookahead: deprecated alias of ``dispatch="scaled_lookahead"``.
    """

    def __init__(
        self,
        global_params: Iterable[Tensor],
        outer_optimizer: torch.optim.Optimizer,
        num_workers: int,
        quorum: int = 1,
        staleness_weighting: str | None = None,
        staleness_a: float = 0.5,
        staleness_b: float = 4,
        max_staleness: int | None = None,
        arrival_weight: float | None = None,
        dispatch: str = "plain",
        lookahead: bool = False,
    ) -> None:
        params = list(global_params)
        if not params:
            raise ValueError(
                "global_params is empty; pass the master tensors the outer optimizer was built over"
            )
        for i, p in enumerate(params):
            if not isinstance(p, Tensor):
                raise ValueError(f"global_params[{i}] is a {type(p).__name__}, expected a torch.Tensor")
            if not p.is_floating_point():
                raise ValueError(
                    f"global_params[{i}] has dtype {p.dtype}; master parameters must be floating point"
                )
        if len({id(p) for p in params}) != len(params):
            raise ValueError("global_params contains the same tensor more than once")
        if not isinstance(outer_optimizer, torch.optim.Optimizer):
            raise ValueError(
                f"outer_optimizer must be a torch.optim.Optimizer, got {type(outer_optimizer).__name__}"
            )
        group_of: dict[int, int] = {}
        for g_idx, group in enumerate(outer_optimizer.param_groups):
            for p in group["params"]:
                group_of[id(p)] = g_idx
        ours = {id(p) for p in params}
        extra = sum(1 for p in params if id(p) not in group_of)
        missing = sum(1 for pid in group_of if pid not in ours)
        if extra or missing:
            raise ValueError(
                "global_params must be exactly the tensors in outer_optimizer.param_groups: "
                f"{extra} of the {len(params)} global_params are not in the optimizer and "
                f"{missing} of the optimizer's {len(group_of)} tensors are not in global_params"
            )
        if not _is_int(num_workers) or num_workers < 1:
            raise ValueError(f"num_workers must be an int >= 1, got {num_workers!r}")
        if not _is_int(quorum) or not 1 <= quorum <= num_workers:
            raise ValueError(f"quorum must be an int in [1, num_workers={num_workers}], got {quorum!r}")
        if staleness_weighting == "none":
            staleness_weighting = None
        if staleness_weighting not in WEIGHTINGS:
            raise ValueError(f"staleness_weighting must be one of {WEIGHTINGS}, got {staleness_weighting!r}")
        if not (isinstance(staleness_a, numbers.Real) and math.isfinite(staleness_a) and staleness_a >= 0):
            raise ValueError(f"staleness_a must be a finite number >= 0, got {staleness_a!r}")
        if not (isinstance(staleness_b, numbers.Real) and math.isfinite(staleness_b) and staleness_b >= 0):
            raise ValueError(f"staleness_b must be a finite number >= 0, got {staleness_b!r}")
        if max_staleness is not None and (not _is_int(max_staleness) or max_staleness < 0):
            raise ValueError(f"max_staleness must be None or an int >= 0, got {max_staleness!r}")
        if arrival_weight is not None and not (
            isinstance(arrival_weight, numbers.Real)
            and not isinstance(arrival_weight, bool)
            and math.isfinite(arrival_weight)
            and arrival_weight > 0
        ):
            raise ValueError(f"arrival_weight must be None or a finite number > 0, got {arrival_weight!r}")
        if lookahead:
            if dispatch not in ("plain", "scaled_lookahead"):
                raise ValueError(
                    f"lookahead=True means dispatch='scaled_lookahead', got dispatch={dispatch!r}"
                )
            dispatch = "scaled_lookahead"
        if dispatch not in DISPATCHES:
            raise ValueError(f"dispatch must be one of {list(DISPATCHES)}, got {dispatch!r}")
        if dispatch != "plain":
            groups = outer_optimizer.param_groups
            if not all("momentum" in g and "lr" in g for g in groups) or not any(
                g["momentum"] for g in groups
            ):
                raise ValueError(
                    f"dispatch={dispatch!r} extrapolates along the outer momentum, but "
                    f"{type(outer_optimizer).__name__} has no 'momentum' > 0 in its param groups; "
                    "use SGD(momentum>0), HeLoCo or DelayedNesterov, or dispatch='plain'"
                )

        self.global_params: list[Tensor] = params
        self.outer_optimizer = outer_optimizer
        self.num_workers = int(num_workers)
        self.quorum = int(quorum)
        self.staleness_weighting = staleness_weighting
        self.staleness_a = float(staleness_a)
        self.staleness_b = float(staleness_b)
        self.max_staleness = max_staleness
        self.arrival_weight = None if arrival_weight is None else float(arrival_weight)
        self.dispatch_mode = dispatch

        self._group_of = [group_of[id(p)] for p in params]
        self._step_takes_staleness = _accepts_keyword(outer_optimizer.step, "staleness")
        self._step_takes_weight = _accepts_keyword(outer_optimizer.step, "weight")
        self._lock = threading.Lock()
        self._version = 0
        self._workers = [_WorkerRecord() for _ in range(self.num_workers)]
        self._pending: list[tuple[int, int, float]] = []  # (worker, τ, weight) of the open quorum round
        self._removed: set[int] = set()  # workers gone for good (remove_worker); they no longer count
        with torch.no_grad():
            # Preallocated, on the masters' device and dtype: the received Δ (also the p.grad of a
            # step), the weighted sum of a pending quorum, and the parameters' pre-step snapshot.
            self._incoming = [torch.empty_like(p, memory_format=torch.contiguous_format) for p in params]
            self._sum = [torch.zeros_like(p) for p in params] if self.quorum > 1 else None
            self._backup = [torch.empty_like(p) for p in params]
        self._state_backup: dict[tuple[int, str], Tensor] = {}

    # ------------------------------------------------------------------ public API

    @property
    def version(self) -> int:
        """Number of outer steps applied so far."""
        with self._lock:
            return self._version

    @property
    def pending_workers(self) -> list[int]:
        """Workers whose Δ waits in the open quorum round, in arrival order."""
        with self._lock:
            return [w for w, _, _ in self._pending]

    @property
    def removed_workers(self) -> list[int]:
        """Workers taken out by ``remove_worker`` (and not re-admitted by a ``dispatch``), sorted."""
        with self._lock:
            return sorted(self._removed)

    @property
    def effective_quorum(self) -> int:
        """Submissions that complete the open round: ``quorum``, lowered to the live workers (plus
        removed workers whose Δ already waits in the round) once some were removed."""
        with self._lock:
            return self._round_quorum()

    def dispatch(self, worker_id: int, *, out: Sequence[Tensor] | None = None) -> Update:
        """Hand ``worker_id`` a copy of the current parameters and record their version as its base.

        With η and μ the ``lr`` and ``momentum`` of the parameter's group and m its
        ``state["momentum_buffer"]`` (absent or zero: no extrapolation), the copy is
        ``dispatch="lookahead"``: θ_t − η·μ·m, one step along the momentum, as HeLoCo's authors
        dispatch (arXiv 2606.00271); ``dispatch="scaled_lookahead"``: θ_t − η·τ̂_i·μ·m, heloco's own
        reading of momentum look-ahead (ICLR 2025 MCDC workshop; the published rule is not public),
        the point the model is expected to reach while the worker trains, with τ̂_i the running mean
        of the worker's observed staleness. Either way the worker's Δ is measured from the point it
        received and applied to θ.

        A worker whose Δ waits in an open quorum round gets ``params=None``: it must wait for the
        round to complete (it is then listed in some ``Update.released``).

        ``out``: tensors shaped like the global parameters (any floating dtype and device, e.g. a
        transport's bf16 reply buffer) to write the parameters into instead of allocating copies;
        ``Update.params`` is then ``out`` itself. The values are exactly those of the allocating call
        converted to ``out``'s dtype. A removed worker that dispatches is re-admitted (it rejoined).
        """
        with self._lock, torch.no_grad():
            self._check_worker(worker_id)
            out = self._check_out(out)
            self._removed.discard(worker_id)
            if any(w == worker_id for w, _, _ in self._pending):
                return Update(params=None, version=self._version)
            self._workers[worker_id].base_version = self._version
            return Update(params=self._params_for(worker_id, out), version=self._version)

    def snapshot(self) -> tuple[list[Tensor], int]:
        """Copies of the current global parameters (never extrapolated) and their version, taken under
        the lock: safe for evaluation or export while other threads submit."""
        with self._lock, torch.no_grad():
            return [p.detach().clone() for p in self.global_params], self._version

    def submit(
        self,
        worker_id: int,
        pseudo_grads: Sequence[Tensor],
        base_version: int,
        *,
        out: Sequence[Tensor] | None = None,
    ) -> Update:
        """Take worker ``worker_id``'s Δ computed from parameters of version ``base_version``.

        Returns the parameters the worker continues from: the new ones after an outer step, the
        current ones if Δ was dropped as too stale (the worker restarts from fresh), or ``None``
        while its quorum round is still open. ``out`` as for ``dispatch`` (left untouched while the
        round is open). It may be the very tensors of ``pseudo_grads`` (a transport answering from
        the buffer Δ arrived in): Δ is read first, and if those tensors have the masters' dtype and
        device the aggregator works on Δ right there instead of copying it (after a failed outer
        step their contents are then unspecified).
        """
        with self._lock, torch.no_grad():
            self._check_worker(worker_id)
            out = self._check_out(out)
            if worker_id in self._removed:
                raise ValueError(
                    f"worker {worker_id} was removed (remove_worker); it must dispatch to rejoin "
                    "before it submits"
                )
            if not _is_int(base_version) or base_version < 0:
                raise ValueError(f"base_version must be an int >= 0, got {base_version!r}")
            if base_version > self._version:
                raise ValueError(
                    f"base_version {base_version} is newer than the server version {self._version}; "
                    "the worker must start from parameters this server dispatched"
                )
            if any(w == worker_id for w, _, _ in self._pending):
                raise ValueError(
                    f"worker {worker_id} already submitted to the open quorum round "
                    f"(pending: {[w for w, _, _ in self._pending]}); it must wait for the round to complete"
                )
            incoming = self._receive(pseudo_grads, out)  # validated Δ in the masters' dtype (scratch)

            tau = self._version - int(base_version)
            weight = staleness_weight(tau, self.staleness_weighting, self.staleness_a, self.staleness_b)
            if self.arrival_weight is not None:
                weight *= self.arrival_weight
            record = self._workers[worker_id]

            if self.max_staleness is not None and tau > self.max_staleness:
                record.observe(tau, dropped=True)
                record.base_version = self._version
                return Update(
                    params=self._params_for(worker_id, out),
                    version=self._version,
                    staleness=tau,
                    dropped=True,
                    weight=0.0,
                    stats={"staleness": float(tau), "weight": 0.0},
                )

            stats = {"staleness": float(tau), "weight": weight}
            if len(self._pending) + 1 < self._round_quorum():
                torch._foreach_add_(self._sum, incoming, alpha=weight)
                self._pending.append((worker_id, tau, weight))
                record.observe(tau, dropped=False)
                return Update(params=None, version=self._version, staleness=tau, weight=weight, stats=stats)

            # This submission completes a round: p.grad = mean of the n (weighted) Δ.
            kwargs: dict[str, Any] = {}
            if self.quorum == 1:
                if self._step_takes_weight:
                    if self.staleness_weighting is not None or self.arrival_weight is not None:
                        # (without any weighting w ≡ 1: pass nothing)
                        kwargs["weight"] = weight
                elif weight != 1.0:
                    torch._foreach_mul_(incoming, weight)
            else:
                if weight != 1.0:
                    torch._foreach_mul_(incoming, weight)
                torch._foreach_add_(incoming, self._sum)
                torch._foreach_div_(incoming, float(len(self._pending) + 1))
            round_tau = max([tau] + [t for _, t, _ in self._pending])
            released = self._complete_round(incoming, round_tau, kwargs, stats)
            record.observe(tau, dropped=False)
            record.base_version = self._version
            return Update(
                params=self._params_for(worker_id, out),
                version=self._version,
                staleness=tau,
                applied=True,
                weight=weight,
                released=released,
                stats=stats,
            )

    def remove_worker(self, worker_id: int) -> Update:
        """Take a worker that is gone for good (left, died, never came) out of the quorum.

        The effective quorum becomes ``min(quorum, live workers + removed workers whose Δ already
        waits in the open round)``: a removed worker's received Δ stays in its round. If the open
        round's submissions now reach that quorum, the round completes here (one outer step on their
        mean) and ``Update.released`` names the waiting workers, which may ``dispatch`` now. Returns
        an ``Update`` with ``params=None`` (nobody gets parameters from this call). Idempotent; a
        ``dispatch`` from the worker re-admits it. Removal is not part of ``state_dict()``: a
        resumed run starts with every worker counted.
        """
        with self._lock, torch.no_grad():
            self._check_worker(worker_id)
            if worker_id in self._removed:
                return Update(params=None, version=self._version)
            self._removed.add(worker_id)
            if not self._pending or len(self._pending) < self._round_quorum():
                return Update(params=None, version=self._version)
            n = len(self._pending)
            torch._foreach_copy_(self._incoming, self._sum)
            if n > 1:
                torch._foreach_div_(self._incoming, float(n))
            round_tau = max(t for _, t, _ in self._pending)
            stats: dict[str, float] = {}
            try:
                released = self._complete_round(self._incoming, round_tau, {}, stats)
            except BaseException:
                self._removed.discard(worker_id)  # nothing changed: the round stays open
                raise
            return Update(params=None, version=self._version, applied=True, released=released, stats=stats)

    def worker_stats(self) -> list[dict[str, Any]]:
        """JSON-able per-worker summary (index = worker id), for logging."""
        with self._lock:
            pending = {w for w, _, _ in self._pending}
            out = []
            for i, r in enumerate(self._workers):
                out.append(
                    {
                        "worker": i,
                        "base_version": r.base_version,
                        "submissions": r.submissions,
                        "dropped": r.dropped,
                        "staleness_mean": r.staleness_mean,
                        "staleness_max": r.staleness_max,
                        "staleness_last": r.staleness_last,
                        "pending": i in pending,
                    }
                )
            return out

    def state_dict(self) -> dict[str, Any]:
        """A self-contained snapshot (tensors cloned) from which ``load_state_dict`` resumes identically."""
        with self._lock:
            pending_sum = None
            if self._pending:
                pending_sum = [t.detach().clone() for t in self._sum]
            return {
                "version": self._version,
                "num_workers": self.num_workers,
                "quorum": self.quorum,
                "global_params": [p.detach().clone() for p in self.global_params],
                "optimizer": copy.deepcopy(self.outer_optimizer.state_dict()),
                "workers": [r.as_dict() for r in self._workers],
                "pending": {
                    "workers": [w for w, _, _ in self._pending],
                    "staleness": [t for _, t, _ in self._pending],
                    "weights": [float(x) for _, _, x in self._pending],
                    "sum": pending_sum,
                },
            }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a ``state_dict()``; everything is validated before anything is changed.

        The weighting, dropping and look-ahead settings come from the constructor (they may differ
        from the saved run's); ``num_workers`` and the parameter shapes must match.
        """
        with self._lock, torch.no_grad():
            sd = state_dict
            for key in ("version", "global_params", "optimizer", "workers", "pending"):
                if key not in sd:
                    raise ValueError(f"aggregator state_dict has no {key!r} entry")
            version = sd["version"]
            if not _is_int(version) or version < 0:
                raise ValueError(f"state_dict['version'] must be an int >= 0, got {version!r}")
            if sd.get("num_workers", self.num_workers) != self.num_workers:
                raise ValueError(
                    f"state_dict was saved with num_workers={sd['num_workers']}, this aggregator has {self.num_workers}"
                )
            self._check_shapes(sd["global_params"], "state_dict['global_params']")
            workers = sd["workers"]
            if len(workers) != self.num_workers:
                raise ValueError(
                    f"state_dict['workers'] has {len(workers)} entries, expected {self.num_workers}"
                )
            records = []
            for i, w in enumerate(workers):
                fields = _WorkerRecord.__dataclass_fields__
                if not isinstance(w, dict) or set(w) != set(fields):
                    raise ValueError(f"state_dict['workers'][{i}] must be a dict with keys {sorted(fields)}")
                r = _WorkerRecord(**w)
                if r.base_version is not None and not 0 <= r.base_version <= version:
                    raise ValueError(
                        f"state_dict['workers'][{i}]['base_version']={r.base_version} is outside [0, {version}]"
                    )
                records.append(r)
            pend = sd["pending"]
            pw, pt, px = list(pend["workers"]), list(pend["staleness"]), list(pend["weights"])
            if not len(pw) == len(pt) == len(px):
                raise ValueError("state_dict['pending'] workers, staleness and weights differ in length")
            if len(pw) >= self.quorum:
                raise ValueError(f"state_dict has {len(pw)} pending submissions, quorum is {self.quorum}")
            if len(set(pw)) != len(pw) or not all(_is_int(w) and 0 <= w < self.num_workers for w in pw):
                raise ValueError(
                    f"state_dict['pending']['workers']={pw} must be distinct ids in [0, {self.num_workers})"
                )
            if pw:
                self._check_shapes(pend["sum"], "state_dict['pending']['sum']")

            self.outer_optimizer.load_state_dict(copy.deepcopy(sd["optimizer"]))
            torch._foreach_copy_(self.global_params, list(sd["global_params"]))
            if self._sum is not None:
                if pw:
                    torch._foreach_copy_(self._sum, list(pend["sum"]))
                else:
                    torch._foreach_zero_(self._sum)
            self._version = int(version)
            self._workers = records
            self._removed.clear()  # liveness belongs to the running session, not to the saved state
            self._pending = [(int(w), int(t), float(x)) for w, t, x in zip(pw, pt, px, strict=True)]

    # ------------------------------------------------------------------ internals

    def _round_quorum(self) -> int:
        if not self._removed:
            return self.quorum
        live = self.num_workers - len(self._removed)
        waiting_removed = sum(1 for w, _, _ in self._pending if w in self._removed)
        return max(1, min(self.quorum, live + waiting_removed))

    def _complete_round(
        self, grads: list[Tensor], round_tau: int, kwargs: dict[str, Any], stats: dict[str, float]
    ) -> list[int]:
        """One outer step on p.grad = ``grads`` (already the round's mean), then close the round:
        returns the pending workers it releases. Nothing changes if the step raises."""
        if self._step_takes_staleness:
            kwargs["staleness"] = round_tau
        self._outer_step(kwargs, grads)
        released = [w for w, _, _ in self._pending]
        self._pending.clear()
        if self._sum is not None:
            torch._foreach_zero_(self._sum)
        self._version += 1
        if self.quorum > 1:
            stats["round_max_staleness"] = float(round_tau)
        last = getattr(self.outer_optimizer, "last_stats", None)
        if last is not None and callable(getattr(last, "as_dict", None)):
            stats.update({f"correction/{k}": float(v) for k, v in last.as_dict().items()})
        return released

    def _check_out(self, out: Any) -> list[Tensor] | None:
        """Validate an ``out=`` list (shapes, floating dtype, not the masters themselves)."""
        if out is None:
            return None
        tensors = self._check_shapes(out, "out")
        masters = {p.data_ptr() for p in self.global_params}
        for i, t in enumerate(tensors):
            if t.data_ptr() in masters:
                raise ValueError(f"out[{i}] shares memory with a global parameter; pass separate tensors")
        return out if isinstance(out, list) else tensors  # Update.params is the caller's own list

    def _check_worker(self, worker_id: Any) -> None:
        if not _is_int(worker_id) or not 0 <= worker_id < self.num_workers:
            raise ValueError(f"worker_id must be an int in [0, {self.num_workers}), got {worker_id!r}")

    def _check_shapes(self, tensors: Any, what: str) -> list[Tensor]:
        if isinstance(tensors, Tensor) or not isinstance(tensors, Iterable):
            raise ValueError(
                f"{what} must be a list of {len(self.global_params)} tensors, got {type(tensors).__name__}"
            )
        tensors = list(tensors)
        if len(tensors) != len(self.global_params):
            raise ValueError(
                f"{what} has {len(tensors)} tensors, the global model has {len(self.global_params)}"
            )
        for i, (t, p) in enumerate(zip(tensors, self.global_params, strict=True)):
            if not isinstance(t, Tensor):
                raise ValueError(f"{what}[{i}] is a {type(t).__name__}, expected a torch.Tensor")
            if t.shape != p.shape:
                raise ValueError(f"{what}[{i}] has shape {tuple(t.shape)}, expected {tuple(p.shape)}")
            if not t.is_floating_point():
                raise ValueError(f"{what}[{i}] has dtype {t.dtype}, expected a floating-point dtype")
        return tensors

    def _receive(self, pseudo_grads: Any, out: list[Tensor] | None = None) -> list[Tensor]:
        """Validate Δ and return it in the masters' dtype and device; raise if not finite.

        Δ is converted into the preallocated ``_incoming`` buffers, unless the caller passed the very
        same tensors as ``out`` (a transport answering from the buffer it received Δ in) and they
        already have the masters' dtype, device and layout: then they serve as the scratch directly,
        which saves a model-sized copy (their contents are overwritten by the reply anyway).
        """
        grads = [g.detach() for g in self._check_shapes(pseudo_grads, "pseudo_grads")]
        reuse = out is not None and all(
            o.data_ptr() == g.data_ptr()
            and o.dtype == g.dtype == p.dtype
            and g.device == p.device
            and g.is_contiguous()
            for o, g, p in zip(out, grads, self.global_params, strict=True)
        )
        if reuse:
            incoming = grads
        else:
            incoming = self._incoming
            torch._foreach_copy_(incoming, grads)
        norms = torch.stack(torch._foreach_norm(incoming))
        if not bool(torch.isfinite(norms).all()):
            for i, t in enumerate(incoming):  # a huge finite tensor may overflow its norm: confirm
                if not bool(torch.isfinite(t).all()):
                    raise ValueError(
                        f"pseudo_grads[{i}] contains NaN or Inf (after conversion to {t.dtype}); nothing was applied"
                    )
        return incoming

    def _lookahead_coefs(self, worker_id: int) -> dict[int, float]:
        """Per param group, the c of the dispatched point θ − c·m (empty: plain θ)."""
        if self.dispatch_mode == "plain":
            return {}
        scale = 1.0
        if self.dispatch_mode == "scaled_lookahead":
            scale = self._workers[worker_id].staleness_mean
            if scale == 0.0:
                return {}
        return {
            g_idx: float(group["lr"]) * scale * float(group["momentum"])
            for g_idx, group in enumerate(self.outer_optimizer.param_groups)
        }

    def _params_for(self, worker_id: int, dest: list[Tensor] | None = None) -> list[Tensor]:
        """Copies of the master parameters, extrapolated along the momentum as ``dispatch`` says;
        written into ``dest`` when given (see ``_params_into``)."""
        if dest is not None:
            return self._params_into(worker_id, dest)
        out = [p.detach().clone() for p in self.global_params]
        coef_of = self._lookahead_coefs(worker_id)
        if not coef_of:
            return out
        by_group: dict[int, tuple[list[Tensor], list[Tensor]]] = {}
        for i, p in enumerate(self.global_params):
            m = self.outer_optimizer.state.get(p, {}).get("momentum_buffer")
            if isinstance(m, Tensor):
                dst, src = by_group.setdefault(self._group_of[i], ([], []))
                dst.append(out[i])
                src.append(m)
        for g_idx, (dst, src) in by_group.items():
            coef = coef_of[g_idx]
            if coef != 0.0:
                torch._foreach_add_(dst, src, alpha=-coef)
        return out

    def _params_into(self, worker_id: int, dest: list[Tensor]) -> list[Tensor]:
        """``_params_for`` into given tensors in one pass each: an extrapolated tensor is computed as
        ``torch.add(θ, m, alpha=−coef, out=d)`` (the same kernel, in the masters' dtype, as the
        allocating path's in-place add, rounded once into ``d``'s dtype), the rest is copied."""
        coef_of = self._lookahead_coefs(worker_id)
        copy_dst, copy_src = [], []
        for i, (p, d) in enumerate(zip(self.global_params, dest, strict=True)):
            coef = coef_of.get(self._group_of[i], 0.0)
            m = self.outer_optimizer.state.get(p, {}).get("momentum_buffer") if coef != 0.0 else None
            if isinstance(m, Tensor):
                if d.device == p.device:
                    torch.add(p.detach(), m, alpha=-coef, out=d)
                else:  # computed where the masters live, then moved: the allocating path's values
                    d.copy_(torch.add(p.detach(), m, alpha=-coef))
            else:
                copy_dst.append(d)
                copy_src.append(p.detach())
        if copy_dst:
            torch._foreach_copy_(copy_dst, copy_src)
        return dest

    def _outer_step(self, kwargs: dict[str, Any], grads: list[Tensor] | None = None) -> None:
        """Run the outer step on p.grad = ``grads`` (default ``_incoming``); on any exception restore θ
        and the optimizer."""
        opt = self.outer_optimizer
        params = self.global_params
        # Snapshot: parameters into a preallocated copy, per-parameter state tensors into cached
        # buffers (one foreach copy each), other state values and group hyperparameters by value.
        torch._foreach_copy_(self._backup, params)
        saved_state: list[dict[str, tuple[Tensor | None, Any]] | None] = []
        src: list[Tensor] = []
        dst: list[Tensor] = []
        for i, p in enumerate(params):
            st = opt.state.get(p)
            if st is None:
                saved_state.append(None)
                continue
            saved: dict[str, tuple[Tensor | None, Any]] = {}
            for k, v in st.items():
                if isinstance(v, Tensor):
                    buf = self._state_backup.get((i, k))
                    if buf is None or buf.shape != v.shape or buf.dtype != v.dtype or buf.device != v.device:
                        buf = self._state_backup[(i, k)] = torch.empty_like(v)
                    src.append(v)
                    dst.append(buf)
                    saved[k] = (v, buf)
                else:
                    saved[k] = (None, copy.deepcopy(v))
            saved_state.append(saved)
        if src:
            torch._foreach_copy_(dst, src)
        saved_groups = [{k: copy.copy(v) for k, v in g.items() if k != "params"} for g in opt.param_groups]

        for p, g in zip(params, self._incoming if grads is None else grads, strict=True):
            p.grad = g
        try:
            opt.step(**kwargs)
        except BaseException:
            torch._foreach_copy_(params, self._backup)
            restore_src, restore_dst = [], []
            for p, saved in zip(params, saved_state, strict=True):
                if saved is None:
                    opt.state.pop(p, None)
                    continue
                new: dict[str, Any] = {}
                for k, (tensor, value) in saved.items():
                    if tensor is not None:
                        restore_dst.append(tensor)
                        restore_src.append(value)
                        new[k] = tensor
                    else:
                        new[k] = value
                opt.state[p] = new
            if restore_src:
                torch._foreach_copy_(restore_dst, restore_src)
            for g, hp in zip(opt.param_groups, saved_groups, strict=True):
                for k in [k for k in g if k != "params" and k not in hp]:
                    del g[k]
                g.update(hp)
            raise
        finally:
            for p in params:
                p.grad = None
