"""The recipes' side of Hub upload: every checkpoint's ``model/`` folder goes to one repo per run with a
fresh model card and loss plot, through :class:`~recipes.hub.upload.HubUploader` (background, never
fails training, never touches the checkpoint)."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

from huggingface_hub import ModelCard

from recipes.analysis.plots import plot_curves, read_evals
from recipes.config import RecipeConfig
from recipes.hub.card import ModelCardInfo, render_model_card
from recipes.hub.upload import HubUploader, redact_secrets

logger = logging.getLogger(__name__)


def describe_partition(metadata: dict[str, Any]) -> str:
    """The data partition as the card shows it, from the shards' metadata.json."""
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
    """One Hub repo per run (``train.hub_model_id``, ``hub_private``, ``hub_revision``); each checkpoint
    is pushed with a card built from the config, the shards' metadata and the latest losses."""

    def __init__(
        self, config: RecipeConfig, metadata: dict[str, Any], output_dir: Path, command: str | None
    ) -> None:
        t = config.train
        self.config = config
        self.metadata = metadata
        self.output_dir = Path(output_dir)
        self.command = command or "recipes/train.py"
        self.uploader = HubUploader(t.hub_model_id, private=t.hub_private, revision=t.hub_revision)

    def card_info(
        self, tokens: int, version: int, losses: dict[str, float], plot: str | None
    ) -> ModelCardInfo:
        """The run as the card reports it (the config's every key is a hyperparameter row)."""
        o = self.config.diloco
        return ModelCardInfo(
            model_name=self.config.train.hub_model_id.split("/")[-1],
            method=o.method,
            hyperparameters={**self.config.to_dict(), "outer_lr (effective)": self.config.outer_lr},
            worker_speeds=list(o.worker_speeds),
            partition=describe_partition(self.metadata),
            language_histogram=histogram(self.metadata),
            tokens_seen=int(tokens),
            validation_loss={k: v for k, v in losses.items() if k != "mean"},
            command=self.command,
            languages=list(self.metadata.get("languages", [])) or None,
            loss_plot=plot,
            step=int(version),
        )

    def push_checkpoint(self, checkpoint: Path, tokens: int, version: int, losses: dict[str, float]) -> None:
        """Queue ``checkpoint/model`` with a card and plot; returns at once. The plot is drawn in a
        temporary directory (the uploader copies it), so the checkpoint folder is never written to.
        A plot or card that cannot be made is logged and the model is pushed without it."""
        with tempfile.TemporaryDirectory(prefix="heloco-card-") as tmp:
            extra: dict[str, Path] = {}
            try:
                evals = read_evals(self.output_dir)
                if len({r["tokens"] for r in evals}) > 1:
                    plot_curves(
                        {self.config.diloco.method: [evals]},
                        "tokens",
                        Path(tmp) / "loss.png",
                        "validation loss",
                    )
                    extra["loss.png"] = Path(tmp) / "loss.png"
            except Exception as err:
                logger.warning("loss plot for the model card failed: %s", redact_secrets(str(err)))
            card: ModelCard | None = None
            try:
                card = render_model_card(
                    self.card_info(tokens, version, losses, "loss.png" if extra else None)
                )
            except Exception as err:
                logger.error("model card failed, pushing without one: %s", redact_secrets(str(err)))
            self.uploader.push(
                checkpoint / "model",
                f"{checkpoint.name}: outer version {version}, {tokens} tokens",
                step=int(version),
                card=card,
                extra_files=extra,
            )

    def close(self, timeout: float = 600.0) -> list[dict[str, Any]]:
        """Wait (bounded) for the last upload; the push history for the run's summary."""
        self.uploader.close(timeout=timeout)
        return self.uploader.history
