"""The parameter server's logic, independent of how messages travel.

``AsyncAggregator`` owns the fp32 master parameters and the outer optimizer built over them. Workers
``dispatch`` to get parameters and their version, train for a round, and ``submit`` their
pseudo-gradient Δ = start − end together with the version they started from. The aggregator measures
the staleness τ = current version − base version, optionally down-weights (polynomial or hinge, Liu et
al. 2024, arXiv 2401.09135) or drops stale Δ, gathers a quorum of q submissions (q = 1: asynchronous
DiLoCo; q = K: synchronous DiLoCo, Douillard et al. 2023, arXiv 2311.08105), writes their mean into
``p.grad`` of the masters and runs one outer step. Every Δ can also be scaled by a constant arrival
weight ρ (the HeLoCo authors use ρ = 1/√K for every asynchronous method). Optionally it hands out
momentum look-ahead points instead of the plain parameters (``dispatch``, see ``heloco.lookahead``).
Three optional policies of ours (``heloco.server_policies``, all off by default) weight each worker by
its arrival rate, keep every worker's latest Δ and step on their mean, or compensate a stale Δ for the
drift of the global model since it was dispatched.

A synchronous run whose worker is gone for good goes on with the others: ``remove_worker`` lowers
the effective quorum to the live workers and completes an open round that now has enough
submissions. ``dispatch``/``submit`` may write the answered parameters into caller-given tensors
(``out=``, e.g. a transport's reply buffer) instead of allocating copies.

Every public method holds one lock, so transports may call it from several threads. Validate, then
mutate: a bad submission (unknown or removed worker, future version, wrong count, shape or dtype,
NaN or Inf) raises ``ValueError`` before anything changes, so it never touches the global model,
the optimizer state or the bookkeeping (``heloco.rounds``). Nothing is copied to be rolled back: if
the outer optimizer itself raises, the bookkeeping is unchanged (the round stays open, the version
does not advance) and whatever the optimizer did is not undone.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.profiler import record_function

from heloco.lookahead import DISPATCHES, dispatched_params, lookahead_coefs, resolve_dispatch
from heloco.protocols import StalenessAwareOptimizer
from heloco.rounds import WEIGHTINGS, RoundBook, staleness_weight
from heloco.server_policies import ServerPolicies
from heloco.validation import (
    check_aggregator_settings,
    check_masters,
    check_out,
    check_tensor_list,
    receive,
)

__all__ = ["DISPATCHES", "WEIGHTINGS", "AsyncAggregator", "Update", "staleness_weight"]


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


class AsyncAggregator:
    """Versions, staleness, weighting/dropping, quorum and look-ahead around one outer optimizer.

    Args:
        global_params: the fp32 master tensors, exactly those in ``outer_optimizer.param_groups``
            (any order; this order is the order of every tensor list exchanged with workers). They
            may live on another device than the workers; Δ is converted on arrival.
        outer_optimizer: any ``torch.optim.Optimizer`` reading Δ from ``p.grad``. A
            ``heloco.protocols.StalenessAwareOptimizer`` (``HeLoCo``, ``DelayedNesterov``) gets τ as
            ``step(staleness=...)`` (the largest τ of the round when q > 1) and, when q = 1 and some
            weighting is configured, the weight as ``step(weight=...)`` with Δ not pre-scaled; its
            ``last_stats`` go to ``Update.stats``. Any other optimizer gets Δ pre-scaled by its weight.
        num_workers: K, worker ids are ``0 .. K-1``.
        quorum: q submissions from distinct workers are averaged into one outer step; 1 is
            asynchronous DiLoCo, K is synchronous DiLoCo.
        staleness_weighting: ``None``, ``"poly"`` or ``"hinge"`` (see ``staleness_weight``).
        staleness_a, staleness_b: the a and b of those weightings.
        max_staleness: drop a Δ whose τ exceeds it (``None``: never drop).
        arrival_weight: a constant ρ > 0 every Δ is multiplied by (times its staleness weight);
            ``None`` is 1. A staleness-aware optimizer gets it as ``weight`` (HeLoCo can then apply it
            before its correction); otherwise Δ is pre-scaled.
        dispatch: which parameters a worker starts from (see ``dispatch``): ``"plain"`` θ,
            ``"lookahead"`` θ − η·μ·m (HeLoCo's), ``"scaled_lookahead"`` θ − η·τ̂_i·μ·m (ours).
        lookahead: deprecated alias of ``dispatch="scaled_lookahead"``.
        worker_weighting, worker_rates, worker_weighting_power, memory, drift_compensation,
            drift_normalization: the optional policies of ``heloco.server_policies`` (formulas and
            sources there): per-worker rate weights, a memory of every worker's latest Δ (quorum 1
            only), compensation of a stale Δ for the drift since its dispatch; off by default.
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
        worker_weighting: str | None = None,
        worker_rates: Sequence[float] | None = None,
        worker_weighting_power: float = 1.0,
        memory: str | None = None,
        drift_compensation: float = 0.0,
        drift_normalization: str = "none",
    ) -> None:
        params = list(global_params)
        group_of = check_masters(params, outer_optimizer)
        if staleness_weighting == "none":
            staleness_weighting = None
        check_aggregator_settings(
            num_workers,
            quorum,
            staleness_weighting,
            staleness_a,
            staleness_b,
            max_staleness,
            arrival_weight,
            weightings=WEIGHTINGS,
        )
        self.dispatch_mode = resolve_dispatch(dispatch, lookahead, outer_optimizer)
        self.policies = ServerPolicies(
            params,
            num_workers,
            quorum,
            worker_weighting,
            worker_rates,
            worker_weighting_power,
            memory,
            drift_compensation,
            drift_normalization,
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
        # Decided once: how the optimizer is driven (heloco.protocols).
        self.staleness_aware = isinstance(outer_optimizer, StalenessAwareOptimizer)
        self._group_of = group_of
        self._lock = threading.Lock()
        self._book = RoundBook(self.num_workers, self.quorum)
        with torch.no_grad():
            # Preallocated, on the masters' device and dtype: the received Δ (also the p.grad of a
            # step) and the weighted sum of a pending quorum.
            self._incoming = [torch.empty_like(p, memory_format=torch.contiguous_format) for p in params]
            self._sum = [torch.zeros_like(p) for p in params] if self.quorum > 1 else None

    # ------------------------------------------------------------------ public API

    @property
    def version(self) -> int:
        """Number of outer steps applied so far."""
        with self._lock:
            return self._book.version

    @property
    def pending_workers(self) -> list[int]:
        """Workers whose Δ waits in the open quorum round, in arrival order."""
        with self._lock:
            return self._book.pending_workers

    @property
    def removed_workers(self) -> list[int]:
        """Workers taken out by ``remove_worker`` (and not re-admitted by a ``dispatch``), sorted."""
        with self._lock:
            return sorted(self._book.removed)

    @property
    def effective_quorum(self) -> int:
        """Submissions that complete the open round: ``quorum``, lowered to the live workers (plus
        removed workers whose Δ already waits in the round) once some were removed."""
        with self._lock:
            return self._book.round_quorum()

    def dispatch(self, worker_id: int, *, out: Sequence[Tensor] | None = None) -> Update:
        """Hand ``worker_id`` a copy of the current parameters and record their version as its base.

        The copy is θ, or a look-ahead point along the outer momentum as ``dispatch`` (the
        constructor argument) says: ``"lookahead"`` θ − η·μ·m, ``"scaled_lookahead"`` θ − η·τ̂_i·μ·m
        (see ``heloco.lookahead``). Either way the worker's Δ is measured from the point it received
        and applied to θ.

        A worker whose Δ waits in an open quorum round gets ``params=None``: it must wait for the
        round to complete (it is then listed in some ``Update.released``).

        ``out``: tensors shaped like the global parameters (any floating dtype and device, e.g. a
        transport's bf16 reply buffer) to write the parameters into instead of allocating copies;
        ``Update.params`` is then ``out`` itself. The values are exactly those of the allocating call
        converted to ``out``'s dtype. A removed worker that dispatches is re-admitted (it rejoined).
        """
        with self._lock, torch.no_grad():
            book = self._book
            book.check_worker(worker_id)
            out = check_out(out, self.global_params)
            book.removed.discard(worker_id)
            if book.is_pending(worker_id):
                return Update(params=None, version=book.version)
            book.workers[worker_id].base_version = book.version
            return Update(params=self._params_for(worker_id, out), version=book.version)

    def snapshot(self) -> tuple[list[Tensor], int]:
        """Copies of the current global parameters (never extrapolated) and their version, taken under
        the lock: safe for evaluation or export while other threads submit."""
        with self._lock, torch.no_grad():
            return [p.detach().clone() for p in self.global_params], self._book.version

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
        step, or a drift-compensated Δ refused as not finite, their contents are then unspecified).
        """
        with self._lock, torch.no_grad(), record_function("heloco.submit"):
            book = self._book
            book.check_worker(worker_id)
            out = check_out(out, self.global_params)
            tau = book.check_submission(worker_id, base_version)
            policies = self.policies
            policies.check_submission(worker_id, base_version)
            # Δ validated (the one finiteness check of an arrival), in the masters' dtype, in scratch:
            incoming = receive(pseudo_grads, self.global_params, self._incoming, out)
            weight = staleness_weight(tau, self.staleness_weighting, self.staleness_a, self.staleness_b)
            if self.arrival_weight is not None:
                weight *= self.arrival_weight
            stats: dict[str, float] = {}
            weight *= policies.worker_weight(worker_id, [r.submissions for r in book.workers], stats)
            record = book.workers[worker_id]

            if self.max_staleness is not None and tau > self.max_staleness:
                record.observe(tau, dropped=True)
                record.base_version = book.version
                return Update(
                    params=self._params_for(worker_id, out),
                    version=book.version,
                    staleness=tau,
                    dropped=True,
                    weight=0.0,
                    stats={"staleness": float(tau), "weight": 0.0},
                )

            stats.update(staleness=float(tau), weight=weight)
            policies.compensate(worker_id, incoming, stats)
            if len(book.pending) + 1 < book.round_quorum():
                torch._foreach_add_(self._sum, incoming, alpha=weight)
                book.pending.append((worker_id, tau, weight))
                record.observe(tau, dropped=False)
                return Update(params=None, version=book.version, staleness=tau, weight=weight, stats=stats)

            # This submission completes a round: p.grad = mean of the n (weighted) Δ.
            kwargs = self._weigh_round(incoming, weight)
            grads = policies.step_grads(worker_id, incoming, stats)  # incoming, or the memory's mean
            released = self._complete_round(grads, book.round_staleness(tau), kwargs, stats)
            policies.commit(worker_id, incoming)
            record.observe(tau, dropped=False)
            record.base_version = book.version
            return Update(
                params=self._params_for(worker_id, out),
                version=book.version,
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
            book = self._book
            book.check_worker(worker_id)
            if worker_id in book.removed:
                return Update(params=None, version=book.version)
            book.removed.add(worker_id)
            if not book.pending or len(book.pending) < book.round_quorum():
                return Update(params=None, version=book.version)
            n = len(book.pending)
            torch._foreach_copy_(self._incoming, self._sum)
            if n > 1:
                torch._foreach_div_(self._incoming, float(n))
            stats: dict[str, float] = {}
            try:
                released = self._complete_round(self._incoming, book.round_staleness(), {}, stats)
            except BaseException:
                book.removed.discard(worker_id)  # the bookkeeping is unchanged: the round stays open
                raise
            return Update(params=None, version=book.version, applied=True, released=released, stats=stats)

    def worker_stats(self) -> list[dict[str, Any]]:
        """JSON-able per-worker summary (index = worker id), for logging."""
        with self._lock:
            return self._book.worker_stats()

    def state_dict(self) -> dict[str, Any]:
        """A self-contained snapshot (tensors cloned) from which ``load_state_dict`` resumes identically."""
        with self._lock:
            book = self._book.state()
            pending_sum = None
            if self._book.pending:
                pending_sum = [t.detach().clone() for t in self._sum]
            return {
                "version": book["version"],
                "num_workers": self.num_workers,
                "quorum": self.quorum,
                "global_params": [p.detach().clone() for p in self.global_params],
                "optimizer": copy.deepcopy(self.outer_optimizer.state_dict()),
                "workers": book["workers"],
                "pending": {**book["pending"], "sum": pending_sum},
                **self.policies.state(),
            }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a ``state_dict()``; everything is validated before anything is changed.

        The weighting, dropping and look-ahead settings come from the constructor (they may differ
        from the saved run's); ``num_workers`` and the parameter shapes must match, and the entries of
        ``memory`` and ``drift_compensation``, when on, must be in the state_dict.
        """
        with self._lock, torch.no_grad():
            sd = state_dict
            for key in ("version", "global_params", "optimizer", "workers", "pending"):
                if key not in sd:
                    raise ValueError(f"aggregator state_dict has no {key!r} entry")
            check_tensor_list(sd["global_params"], self.global_params, "state_dict['global_params']")
            version, records, pending = self._book.parse_state(sd)
            policies = self.policies.parse_state(sd, version)
            if pending:
                check_tensor_list(sd["pending"]["sum"], self.global_params, "state_dict['pending']['sum']")

            self.outer_optimizer.load_state_dict(copy.deepcopy(sd["optimizer"]))
            torch._foreach_copy_(self.global_params, list(sd["global_params"]))
            if self._sum is not None:
                if pending:
                    torch._foreach_copy_(self._sum, list(sd["pending"]["sum"]))
                else:
                    torch._foreach_zero_(self._sum)
            self._book.restore(version, records, pending)
            self.policies.restore(policies)

    # ------------------------------------------------------------------ internals

    def _weigh_round(self, incoming: list[Tensor], weight: float) -> dict[str, Any]:
        """Turn ``incoming`` into the completing round's p.grad (in place); return the ``step``
        keywords. Quorum 1: a staleness-aware optimizer gets the weight itself (when some weighting
        is configured; otherwise w ≡ 1 and nothing is passed), any other gets Δ pre-scaled.
        Quorum > 1: the weighted mean of the round's Δ. With ``memory`` Δ is always pre-scaled."""
        if self.quorum == 1:
            if self.staleness_aware and self.policies.memory is None:
                weighted = (self.staleness_weighting, self.arrival_weight, self.policies.worker_weighting)
                if any(x is not None for x in weighted):
                    return {"weight": weight}
            elif weight != 1.0:
                torch._foreach_mul_(incoming, weight)
            return {}
        if weight != 1.0:
            torch._foreach_mul_(incoming, weight)
        torch._foreach_add_(incoming, self._sum)
        torch._foreach_div_(incoming, float(len(self._book.pending) + 1))
        return {}

    def _complete_round(
        self, grads: list[Tensor], round_tau: int, kwargs: dict[str, Any], stats: dict[str, float]
    ) -> list[int]:
        """One outer step on p.grad = ``grads`` (already the round's mean), then close the round:
        returns the pending workers it releases. The bookkeeping changes only if the step returns."""
        if self.staleness_aware:
            kwargs["staleness"] = round_tau
        params = self.global_params
        for p, g in zip(params, grads, strict=True):
            p.grad = g
        try:
            with record_function("heloco.outer_step"):
                self.outer_optimizer.step(**kwargs)
        finally:
            for p in params:
                p.grad = None
        released = self._book.close_round()
        if self._sum is not None:
            torch._foreach_zero_(self._sum)
        if self.quorum > 1:
            stats["round_max_staleness"] = float(round_tau)
        last = self.outer_optimizer.last_stats if self.staleness_aware else None
        if last is not None:
            stats.update({f"correction/{k}": float(v) for k, v in last.as_dict().items()})
        return released

    def _params_for(self, worker_id: int, dest: list[Tensor] | None = None) -> list[Tensor]:
        """What ``worker_id`` starts from (θ or its look-ahead point), copied or written into ``dest``
        (and kept as the worker's base with drift compensation)."""
        coef_of = lookahead_coefs(
            self.dispatch_mode,
            self.outer_optimizer.param_groups,
            self._book.workers[worker_id].staleness_mean,
        )
        state = self.outer_optimizer.state
        return self.policies.dispatched(
            worker_id,
            self._book.version,
            lambda into: dispatched_params(self.global_params, state, self._group_of, coef_of, into),
            dest,
        )
