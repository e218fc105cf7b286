"""The model card of a pushed checkpoint: ``card_template.md`` (a Jinja template with a YAML header) filled
from the run's config and metrics through ``huggingface_hub.ModelCard.from_template``.

The layout lives in the template so it can be edited as Markdown; this module only turns the run into
strings (tables, thousands separators, perplexities) and the YAML metadata the Hub indexes.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from huggingface_hub import ModelCard, ModelCardData

from recipes.hub.upload import redact_secrets

TEMPLATE = Path(__file__).with_name("card_template.md")


@dataclasses.dataclass(kw_only=True)
class ModelCardInfo:
    """What the card reports about one run; the recipe fills it from its config and metrics.

    ``hyperparameters`` may nest (``{"inner": {"lr": 4e-4}}`` is shown as ``inner.lr``).
    ``language_histogram`` is ``{worker_id: {language: tokens}}`` for workers ``0..K-1``.
    ``loss_plot`` is a path inside the pushed repo (e.g. ``"loss.png"``) of an image to embed.
    """

    model_name: str
    method: str
    hyperparameters: Mapping[str, Any]
    worker_speeds: Sequence[float]
    partition: str
    language_histogram: Mapping[int, Mapping[str, int]]
    tokens_seen: int
    validation_loss: Mapping[str, float]
    command: str
    languages: Sequence[str] | None = None
    datasets: Sequence[str] = ()
    license: str = "apache-2.0"
    library_name: str = "transformers"
    tags: Sequence[str] = ("llama",)
    loss_plot: str | None = None
    step: int | None = None

    def __post_init__(self) -> None:
        # Only what would silently give a wrong card; the recipe's config is validated already.
        speeds = [float(s) for s in self.worker_speeds]
        if not speeds or not all(math.isfinite(s) and s > 0 for s in speeds):
            raise ValueError(f"worker_speeds must be finite and > 0 steps/s, got {speeds}")
        if sorted(int(k) for k in self.language_histogram) != list(range(len(speeds))):
            raise ValueError(
                f"language_histogram must have exactly the workers 0..{len(speeds) - 1}, "
                f"got {sorted(self.language_histogram)}"
            )
        self.worker_speeds = speeds

    @property
    def num_workers(self) -> int:
        return len(self.worker_speeds)


def render_model_card(info: ModelCardInfo) -> ModelCard:
    """The card (YAML metadata + Markdown body) for ``info``, with any Hugging Face token redacted."""
    data = ModelCardData(
        language=list(info.languages if info.languages is not None else _languages(info)),
        license=info.license,
        library_name=info.library_name,
        tags=list(dict.fromkeys(["heloco", "diloco", _slug(info.method), *info.tags])),
        datasets=list(info.datasets) or None,
        pipeline_tag="text-generation",
    )
    histogram = {
        int(k): dict(v) for k, v in sorted(info.language_histogram.items(), key=lambda kv: int(kv[0]))
    }
    langs = sorted({lang for row in histogram.values() for lang in row})
    fastest = max(info.worker_speeds)
    card = ModelCard.from_template(
        data,
        template_path=str(TEMPLATE),
        model_name=info.model_name,
        step=info.step,
        method=info.method,
        num_workers=info.num_workers,
        tokens_seen=f"{info.tokens_seen:,}",
        hyperparameter_table=table(
            ["hyperparameter", "value"], [[k, str(v)] for k, v in flatten(info.hyperparameters)]
        ),
        worker_table=table(
            ["worker", "speed (steps/s)", "relative speed"],
            [[str(i), f"{s:g}", f"{s / fastest:.2f}"] for i, s in enumerate(info.worker_speeds)],
        ),
        dataset_list=", ".join(info.datasets) if info.datasets else "local data",
        partition=info.partition,
        token_table=table(
            ["worker", *langs, "total"],
            [
                [str(w), *(f"{row.get(lang, 0):,}" for lang in langs), f"{sum(row.values()):,}"]
                for w, row in histogram.items()
            ]
            + [
                [
                    "total",
                    *(f"{sum(r.get(lang, 0) for r in histogram.values()):,}" for lang in langs),
                    f"{sum(sum(r.values()) for r in histogram.values()):,}",
                ]
            ],
        ),
        loss_table=table(
            ["language", "validation loss", "perplexity"],
            [[lang, f"{loss:.4f}", perplexity(loss)] for lang, loss in sorted(info.validation_loss.items())],
        ),
        loss_plot=info.loss_plot,
        fence="````" if "```" in info.command else "```",
        command=info.command,
    )
    return ModelCard(redact_secrets(str(card)))


def flatten(mapping: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """Nested mappings as dotted names, in order: one table row per hyperparameter."""
    out: list[tuple[str, Any]] = []
    for key, value in mapping.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out += flatten(value, prefix=f"{name}.")
        else:
            out.append((name, value))
    return out


def table(header: list[str], rows: list[list[str]]) -> str:
    """A Markdown table; ``|`` and newlines in cells are escaped so a value cannot break the layout."""

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(str(c).replace("|", "\\|").replace("\n", " ") for c in cells) + " |"

    return "\n".join([line(header), "|" + "|".join("---" for _ in header) + "|", *(line(r) for r in rows)])


def perplexity(loss: float) -> str:
    """e^loss as text; "n/a" for a non-finite loss, "inf" where e^loss overflows."""
    if not math.isfinite(loss):
        return "n/a"
    return f"{math.exp(loss):.2f}" if loss < 700 else "inf"


def _languages(info: ModelCardInfo) -> list[str]:
    found = {lang for row in info.language_histogram.values() for lang in row}
    return sorted(found | set(info.validation_loss))


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9.+-]+", "-", text.lower()).strip("-") or "method"
