"""Encoder export: Hugging Face encoder → ONNX (mean-pooled rows) → fused → static int8.

The exported graph takes ``input_ids`` and ``attention_mask`` ``[batch, seq]`` and returns the
masked mean of the last hidden states, ``pooled [batch, dim]``, and the last hidden states
themselves, ``states [batch, seq, dim]``, for span extractors. Normalisation and the heads stay
outside the graph, so one encoder artifact serves every classifier and extractor built on it (a
session asked for both outputs runs the encoder once).
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from appliance.artifact.torch_maths import masked_mean_pool
from appliance.factory.int8 import TextBatches, default_calibration_texts, quantize_int8

log = logging.getLogger(__name__)

OPSET = 17
CALIBRATION_WINDOW = 128  # tokens per calibration text: the factory's default serving window
# Tokenizer files copied next to the ONNX graph so an encoder artifact is self-contained.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")


class MeanPooledEncoder(nn.Module):
    """Wraps an encoder so its outputs are the attention-masked mean of the token states, and the
    token states."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        states = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return masked_mean_pool(states, attention_mask), states


def export_onnx(encoder: nn.Module, out_path: Path) -> Path:
    """Export ``encoder`` (a Hugging Face ``AutoModel``) with dynamic batch and sequence axes."""
    model = MeanPooledEncoder(encoder).eval()
    ids = torch.ones(2, 8, dtype=torch.long)
    mask = torch.ones(2, 8, dtype=torch.long)
    with torch.no_grad():
        torch.onnx.export(
            model,
            (ids, mask),
            str(out_path),
            input_names=["input_ids", "attention_mask"],
            output_names=["pooled", "states"],
            dynamic_axes={
                "input_ids": {0: "batch", 1: "seq"},
                "attention_mask": {0: "batch", 1: "seq"},
                "pooled": {0: "batch"},
                "states": {0: "batch", 1: "seq"},
            },
            opset_version=OPSET,
            dynamo=False,
        )
    return out_path


def fuse(onnx_path: Path, out_path: Path, num_heads: int, hidden_size: int) -> Path:
    """ONNX Runtime transformer fusion for BERT-style encoders: skip + layer norm, bias + GELU.

    Attention stays unfused: the SDPA attention that transformers 5 exports matches no ONNX Runtime
    pattern. Exporting with eager attention would fuse it (6 Attention nodes), but measured no gain
    for the int8 encoders that get published and +18% for fp32 only (bench/PERF.md), while every
    encoder id would change.
    """
    from onnxruntime.transformers.optimizer import optimize_model

    optimized = optimize_model(
        str(onnx_path), model_type="bert", num_heads=num_heads, hidden_size=hidden_size, opt_level=1
    )
    optimized.save_model_to_file(str(out_path))
    return out_path


def export_encoder_folders(
    base: Path,
    out_dir: Path,
    encoder: nn.Module | None = None,
    calibration_texts: Sequence[str] | None = None,
    window: int = CALIBRATION_WINDOW,
) -> dict[str, Path]:
    """Write ``out_dir/fp32`` and ``out_dir/int8``, each a self-contained encoder folder
    (fused ``model.onnx`` plus tokenizer files), ready for :meth:`ModelStore.put_encoder`.

    ``encoder`` overrides the weights in ``base`` (a fine-tuned encoder); the tokenizer and the
    architecture always come from ``base``. ``calibration_texts`` set the int8 activation ranges
    (default: a fixed sample of the packaged Banking77 training texts, so a base exports the same
    int8 encoder wherever it is exported).
    """
    from transformers import AutoConfig, AutoModel

    config = AutoConfig.from_pretrained(base, local_files_only=True)
    if encoder is None:
        encoder = AutoModel.from_pretrained(base, local_files_only=True)
    folders = {"fp32": out_dir / "fp32", "int8": out_dir / "int8"}
    for folder in folders.values():
        folder.mkdir(parents=True, exist_ok=True)
        for name in TOKENIZER_FILES:
            if (base / name).exists():
                shutil.copy2(base / name, folder / name)
    with tempfile.TemporaryDirectory() as tmp:
        raw = export_onnx(encoder, Path(tmp) / "raw.onnx")
        fuse(raw, folders["fp32"] / "model.onnx", config.num_attention_heads, config.hidden_size)
    texts = default_calibration_texts() if calibration_texts is None else calibration_texts
    calibration = TextBatches(folders["fp32"] / "tokenizer.json", texts, window)
    quantize_int8(folders["fp32"] / "model.onnx", folders["int8"] / "model.onnx", calibration)
    return folders
