"""Push the global model of each checkpoint to the Hugging Face Hub with a model card, in the
background (heloco.hub.HubPusher): a slow or failing Hub never stops training or touches the local
checkpoint."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from heloco.hub import HubPusher, ModelCardInfo, render_model_card
from recipes.config import RecipeConfig
from recipes.plots import plot_curves, read_evals

logger = logging.getLogger(__name__)


def describe_partition(metadata: dict[str, Any]) -> str:
    part = metadata.get("partition", {})
    scheme = part.get("scheme", "unknown")
    if scheme == "dominant":
        return f"dominant-language (p={part.get('p')})"
    if scheme == "dirichlet":
        return f"dirichlet (alpha={part.get('alpha')})"
    return str(scheme)


def histogram(metadata: dict[str, Any]) -> dict[int, dict[str, int]]:
    """metadata's ``{"worker_k": {lang: tokens}}`` as ``{k: {lang: tokens}}``."""
    return {int(str(k).rsplit("_", 1)[-1]): dict(v) for k, v in metadata["tokens_per_worker"].items()}


class CheckpointPusher:
    """One Hub repo per run; every checkpoint's ``model/`` folder is pushed with a fresh card and plot."""

    def __init__(self, config: RecipeConfig, metadata: dict[str, Any], output_dir: Path, command: str | None):
        t = config.train
        self.config = config
        self.metadata = metadata
        self.output_dir = Path(output_dir)
        self.command = command or "recipes/train.py"
        self.pusher = HubPusher(t.hub_model_id, private=t.hub_private, revision=t.hub_revision)

    def card_info(
        self, tokens: int, version: int, losses: dict[str, float], plot: str | None
    ) -> ModelCardInfo:
        o = self.config.diloco
        return ModelCardInfo(
            model_name=self.config.train.hub_model_id.split("/")[-1],
            method=o.method,
            hyperparameters={**self.config.to_dict(), "outer_lr (effective)": self.config.outer_lr},
            num_workers=o.num_workers,
            worker_speeds=list(o.worker_speeds),
            partition=describe_partition(self.metadata),
            language_histogram=histogram(self.metadata),
            tokens_seen=int(tokens),
            validation_loss={k: v for k, v in losses.items() if k != "mean"},
            command=self.command,
            languages=list(self.metadata.get("languages", [])),
            loss_plot=plot,
            step=int(version),
        )

    def push_checkpoint(self, checkpoint: Path, tokens: int, version: int, losses: dict[str, float]) -> None:
        extra = {}
        plot_path = checkpoint / "loss.png"
        try:
            evals = read_evals(self.output_dir)
            if len({r["tokens"] for r in evals}) > 1:
                plot_curves({self.config.diloco.method: [evals]}, "tokens", plot_path, "validation loss")
                extra["loss.png"] = plot_path
        except Exception as err:  # a plot is a nicety; never let it stop a checkpoint
            logger.warning("loss plot for the model card failed: %s", err)
        card = render_model_card(self.card_info(tokens, version, losses, "loss.png" if extra else None))
        self.pusher.push(
            checkpoint / "model",
            f"{checkpoint.name}: outer version {version}, {tokens} tokens",
            step=int(version),
            card=card,
            extra_files=extra,
        )

    def close(self, timeout: float = 600.0) -> list[dict[str, Any]]:
        self.pusher.close(timeout=timeout)
        return self.pusher.history
