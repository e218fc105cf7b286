"""Checkpoints to the Hugging Face Hub, in the background, with a model card. Only the recipes use it;
the library (``heloco``) never imports ``huggingface_hub``.

    upload.py          HubUploader (HfApi.upload_folder on a daemon worker thread), PushRecord, redact_secrets
    card.py            ModelCardInfo, render_model_card: card_template.md filled via ModelCard.from_template
    checkpoint.py      CheckpointPusher: what train.py and distributed.py call per checkpoint
"""

from recipes.hub.card import ModelCardInfo, render_model_card
from recipes.hub.checkpoint import CheckpointPusher
from recipes.hub.upload import HubUploader, PushRecord, redact_secrets

__all__ = [
    "CheckpointPusher",
    "HubUploader",
    "ModelCardInfo",
    "PushRecord",
    "redact_secrets",
    "render_model_card",
]
