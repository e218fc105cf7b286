"""Distributed mode's network options, built the same way on every rank: the codec Δ travels in
(``uplink_codec`` and its options; the server decodes with its own copy), the codec of the replies'
change (``downlink: delta`` with ``downlink_codec``, as in the simulator), this worker's encoder
(the codec, in an ``ErrorFeedback`` when ``error_feedback``) and the emulated slow link
(``uplink_bandwidth``/``uplink_latency``/``downlink_bandwidth``/``downlink_latency``: the transport
sleeps ``latency + bytes / bandwidth`` per message, ``heloco.distributed.link``)."""

from __future__ import annotations

from typing import Any

import torch

from heloco.codecs import Codec
from heloco.distributed.link import EmulatedLink, wire_itemsize
from heloco.outgoing import Encoder
from recipes.config import NETWORK_FIELDS, RecipeConfig
from recipes.simulator import configured_codec, uplink_codec, uplink_encoder

__all__ = ["emulated_link", "reply_codec", "wire_codec", "worker_encoder"]


def wire_codec(config: RecipeConfig) -> Codec | None:
    """The codec on the wire, the same on the server and every worker (None: fp32, plain tensors)."""
    return uplink_codec(config)


def reply_codec(config: RecipeConfig) -> Codec | None:
    """``downlink: delta``: the codec of each reply's change (``downlink_codec`` with its options),
    the same on the server and every worker; None with ``downlink: params`` (full parameters)."""
    if config.diloco.downlink == "params":
        return None
    return configured_codec(config, config.diloco.downlink_codec)


def worker_encoder(config: RecipeConfig) -> Encoder | None:
    """This worker's encoder of Δ (a residual of its own with error feedback); None for fp32."""
    return uplink_encoder(config)


def _for_worker(values: list[float] | None, worker: int) -> float | None:
    if values is None:
        return None
    return float(values[0] if len(values) == 1 else values[worker])


def emulated_link(config: RecipeConfig, transport: Any, worker: int) -> Any:
    """``transport`` behind this worker's emulated link, or ``transport`` itself when no link
    field is set (the default path: nothing wraps it)."""
    o = config.diloco
    if all(getattr(o, name) is None for name in NETWORK_FIELDS):
        return transport
    return EmulatedLink(
        transport,
        uplink_bandwidth=_for_worker(o.uplink_bandwidth, worker),
        uplink_latency=_for_worker(o.uplink_latency, worker) or 0.0,
        downlink_bandwidth=_for_worker(o.downlink_bandwidth, worker),
        downlink_latency=_for_worker(o.downlink_latency, worker) or 0.0,
        wire_itemsize=wire_itemsize(getattr(torch, o.wire_dtype)),
    )
