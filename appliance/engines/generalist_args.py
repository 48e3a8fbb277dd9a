"""The generalist's settings: one object from the config file or CLI to the engine.

``appliance serve`` (the Serve config's ``generalist:`` section, ``--generalist`` flags) builds a
:class:`GeneralistArgs`; the Serve application hands it to the deployment, which hands it to
:class:`appliance.engines.generalist.GeneralistEngine`.

The context window (``max_model_len``) comes from the model folder: the smaller of
:data:`DEFAULT_MAX_MODEL_LEN` and what the model's ``config.json`` says it was trained for. An
explicit value may lower it, but not raise it past the model's: vLLM would refuse to start, after
seconds of loading, with a message about its own settings.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from appliance.errors import InvalidArgument

DEFAULT_MAX_MODEL_LEN = 2048
DEFAULT_NAME = "default"  # the single ``generalist:`` form, or a bare ``--generalist PATH``
NAME_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,31}$"
MIN_MAX_MODEL_LEN = 16
# config.json keys that bound a model's positions, as Hugging Face architectures spell them.
POSITION_KEYS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length", "max_sequence_length")


class GeneralistArgs(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    path: str  # a local Hugging Face causal-LM folder
    name: str = Field(DEFAULT_NAME, pattern=NAME_PATTERN)  # what the cascade and requests call it
    price_per_hour: float | None = Field(None, ge=0)  # its deployment's share of the box; None: the box's
    max_model_len: int | None = Field(None, ge=MIN_MAX_MODEL_LEN)  # None: derived from the model
    kv_cache_gib: float = Field(1.0, gt=0)
    max_concurrency: int = Field(8, ge=1)  # requests in flight; more are refused, not queued
    num_gpus: int = Field(0, ge=0)  # per replica; 0: CPU
    tensor_parallel_size: int = Field(1, ge=1)
    num_replicas: int = Field(1, ge=1)
    enforce_eager: bool = False  # skip torch.compile: starts ~30 s sooner, decodes slower
    dtype: str | None = None  # None: float32 on CPU, the checkpoint's own type on GPU
    seed: int = 0

    @model_validator(mode="after")
    def _one_gpu_per_rank(self) -> GeneralistArgs:
        if self.num_gpus and self.num_gpus != self.tensor_parallel_size:
            raise ValueError(
                f"a generalist replica uses one GPU per tensor-parallel rank: num_gpus={self.num_gpus} "
                f"but tensor_parallel_size={self.tensor_parallel_size}"
            )
        return self

    def window(self) -> int:
        """The ``max_model_len`` to start vLLM with; ``InvalidArgument`` if it cannot work."""
        trained = model_positions(Path(self.path))
        if self.max_model_len is None:
            return DEFAULT_MAX_MODEL_LEN if trained is None else min(DEFAULT_MAX_MODEL_LEN, trained)
        if trained is not None and self.max_model_len > trained:
            raise InvalidArgument(
                f"max_model_len {self.max_model_len} is more than the {trained} positions the model at "
                f"{self.path} was trained for; use at most {trained}, or leave it unset"
            )
        return self.max_model_len


def model_positions(model_path: Path) -> int | None:
    """The most tokens the model's ``config.json`` allows (None when it names no bound)."""
    config_file = model_path / "config.json"
    try:
        config: Any = json.loads(config_file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InvalidArgument(f"{model_path} is not a model folder (no config.json)") from None
    except (OSError, ValueError) as e:
        raise InvalidArgument(f"cannot read {config_file}: {e}") from e
    if not isinstance(config, dict):
        raise InvalidArgument(f"{config_file} is not a JSON object")
    # Multimodal checkpoints keep the language model's settings in a nested section.
    text_config = config.get("text_config")
    section = text_config if isinstance(text_config, dict) else config
    bounds = [
        v for key in POSITION_KEYS if isinstance(v := section.get(key), int) and not isinstance(v, bool)
    ]
    positive = [v for v in bounds if v > 0]
    return min(positive) if positive else None
