"""The job's key-value store, as this attempt of the job sees it (a launcher restart starts a new
attempt in the same store)."""

from __future__ import annotations

import os

import torch.distributed as dist

RESTART_ENV = "TORCHELASTIC_RESTART_COUNT"  # set by torchrun's agent: > 0 after a restart


AGENT_STORE_ENV = "TORCHELASTIC_USE_AGENT_STORE"  # "True": the agent hosts the job's store


def attempt_prefix() -> str | None:
    """The store namespace of this attempt of the job (None on the first one).

    torchrun's agent keeps ONE TCPStore for all the attempts of a job (``--max_restarts``): the static
    rendezvous Accelerate uses creates it once, the c10d one shares its own, and since torch 2.5 the
    ranks no longer put each attempt's keys under a prefix of their own. A relaunched group would
    then read what the previous attempt left there: gloo's peer addresses of dead processes
    (``connectFullMesh``: connection refused), and our incarnation counters and pair groups. Every
    key of an attempt > 0 lives under ``/worker/attempt_<n>/`` instead (torch's former prefix)."""
    attempt = int(os.environ.get(RESTART_ENV, "0") or 0)
    return f"/worker/attempt_{attempt}" if attempt > 0 else None


def attempt_store(store: dist.Store) -> dist.Store:
    """``store`` (the job's TCPStore) seen through this attempt's namespace (``attempt_prefix``)."""
    prefix = attempt_prefix()
    return store if prefix is None else dist.PrefixStore(prefix, store)


def job_store() -> dist.Store:
    """The job's store for this attempt (the one the transport uses as well): the TCPStore
    underneath the default group's store, within this attempt's namespace (``attempt_prefix``)."""
    store = dist.distributed_c10d._get_default_store()
    while isinstance(store, dist.PrefixStore):
        store = store.underlying_store
    return attempt_store(store)
