"""heloco: asynchronous DiLoCo-style training with stale pseudo-gradient correction.

Public API (stable names):
    HeLoCo, DelayedNesterov        outer optimizers (torch.optim.Optimizer; Δ read from p.grad)
    correct_pseudo_gradient        the correction as a pure in-place function, with CorrectionStats
    AsyncAggregator, Update        the server's logic (versions, staleness, quorum, look-ahead)
    DiLoCoWorker                   drop-in context manager around a user's inner optimizer
    InProcessTransport             worker ↔ server in one process
    make_codec, ErrorFeedback      compressed pseudo-gradients (fp32, bf16, int8, top-k) with error feedback
"""

from heloco.aggregator import AsyncAggregator, Update
from heloco.codecs import CODEC_NAMES, Codec, EncodedMessage, ErrorFeedback, MalformedMessage, make_codec
from heloco.correction import CorrectionStats, correct_pseudo_gradient
from heloco.optim import HELOCO_DEFAULTS, DelayedNesterov, HeLoCo
from heloco.transport import InProcessTransport
from heloco.worker import DiLoCoWorker

__all__ = [
    "CODEC_NAMES",
    "HELOCO_DEFAULTS",
    "AsyncAggregator",
    "Codec",
    "CorrectionStats",
    "DelayedNesterov",
    "DiLoCoWorker",
    "EncodedMessage",
    "ErrorFeedback",
    "HeLoCo",
    "InProcessTransport",
    "MalformedMessage",
    "Update",
    "correct_pseudo_gradient",
    "make_codec",
]
__version__ = "0.1.0"
