"""heloco: asynchronous DiLoCo-style training with stale pseudo-gradient correction.

Public API (stable names):
    HeLoCo, DelayedNesterov        outer optimizers (torch.optim.Optimizer; Δ read from p.grad)
    correct_pseudo_gradient        the correction as a pure in-place function, with CorrectionStats
    AsyncAggregator, Update        the server's logic (versions, staleness, quorum, look-ahead)
    DiLoCoWorker                   drop-in context manager around a user's inner optimizer
    InProcessTransport             worker ↔ server in one process
"""

from heloco.aggregator import AsyncAggregator, Update
from heloco.correction import CorrectionStats, correct_pseudo_gradient
from heloco.optim import HELOCO_DEFAULTS, DelayedNesterov, HeLoCo
from heloco.transport import InProcessTransport
from heloco.worker import DiLoCoWorker

__all__ = [
    "HELOCO_DEFAULTS",
    "AsyncAggregator",
    "CorrectionStats",
    "DelayedNesterov",
    "DiLoCoWorker",
    "HeLoCo",
    "InProcessTransport",
    "Update",
    "correct_pseudo_gradient",
]
__version__ = "0.1.0"
