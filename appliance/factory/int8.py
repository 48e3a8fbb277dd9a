"""int8 encoders: the quantization recipes the factory can publish, and their calibration.

The published recipe is static: activation scales are calibrated once, on a fixed set of texts,
and stored in the graph (QDQ), so a text's embedding does not depend on the texts it is batched
with nor on its padding. Dynamic quantization computes the activation scales per call from the
whole batch, which moved 1-3% of Banking77 labels between "alone" and "in a batch" (bench/INT8.md).
"""

from __future__ import annotations

import contextlib
import csv
import logging
import re
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import onnx

log = logging.getLogger(__name__)

CALIBRATION_FILE = Path(__file__).resolve().parents[1] / "data" / "banking77" / "train.csv"
CALIBRATION_TEXTS = 256  # texts that set the activation ranges; more moved no accuracy (bench/INT8.md)
CALIBRATION_BATCH = 16  # texts per calibration call, sorted by length so padding is rare
# MatMuls left float: the attention products (activation x activation: no weights to save, and
# the softmax input is the most range-sensitive tensor), and the FFN output (post-GELU inputs
# have outliers that min/max ranges waste most of the 8 bits on).
ATTENTION = (r"attention/self/MatMul(_1)?$",)
FFN_OUT = (r"layer\.\d+/output/dense/MatMul$",)


@dataclass(frozen=True)
class Recipe:
    name: str
    static: bool
    activation_signed: bool = True
    reduce_range: bool = False
    float_matmuls: tuple[str, ...] = ()  # patterns of the MatMul node names that stay float


def _recipes(*recipes: Recipe) -> dict[str, Recipe]:
    return {r.name: r for r in recipes}


RECIPES = _recipes(
    Recipe("dynamic", static=False),
    Recipe("static-s8s8", static=True),
    # u8 activations with 7-bit weights: the form that does not saturate on AVX2 without VNNI
    Recipe("static-u8s8-rr", static=True, activation_signed=False, reduce_range=True),
    Recipe("static-s8s8-w", static=True, float_matmuls=ATTENTION),
    Recipe(
        "static-u8s8-rr-w", static=True, activation_signed=False, reduce_range=True, float_matmuls=ATTENTION
    ),
    Recipe(
        "static-u8s8-rr-w-ffn",
        static=True,
        activation_signed=False,
        reduce_range=True,
        float_matmuls=ATTENTION + FFN_OUT,
    ),
    Recipe("static-s8s8-w-ffn", static=True, float_matmuls=ATTENTION + FFN_OUT),
)
# Measured best on Banking77 (bench/INT8.md): -0.1 point, cosine 0.991, faster than fp32. s8
# activations were as accurate but five times slower than fp32 in ONNX Runtime's CPU kernels.
PUBLISHED = "static-u8s8-rr-w-ffn"


def default_calibration_texts(n: int = CALIBRATION_TEXTS) -> list[str]:
    """A fixed spread of the packaged Banking77 training texts (every k-th row), so the shared base
    encoders exported for every head-mode specialist are the same bytes on every machine."""
    with CALIBRATION_FILE.open(newline="", encoding="utf-8") as handle:
        texts = [row["text"] for row in csv.DictReader(handle)]
    step = max(1, len(texts) // n)
    return texts[::step][:n]


class TextBatches:
    """A ``CalibrationDataReader``: ``input_ids``/``attention_mask`` feeds for the calibration texts,
    tokenized as the serving encoder does and grouped by length."""

    def __init__(self, tokenizer_file: Path, texts: Sequence[str], window: int) -> None:
        from tokenizers import Tokenizer

        from appliance.artifact.maths import truncate

        tokenizer = Tokenizer.from_file(str(tokenizer_file))
        tokenizer.no_padding()
        tokenizer.no_truncation()
        pad = tokenizer.token_to_id("[PAD]") or 0
        rows = sorted((truncate(e.ids, window)[0] for e in tokenizer.encode_batch(list(texts))), key=len)
        self._feeds = [
            _padded(rows[i : i + CALIBRATION_BATCH], pad) for i in range(0, len(rows), CALIBRATION_BATCH)
        ]
        self._iter: Iterator[dict[str, np.ndarray]] = iter(self._feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._iter, None)

    def rewind(self) -> None:
        self._iter = iter(self._feeds)


def _padded(rows: Sequence[Sequence[int]], pad: int) -> dict[str, np.ndarray]:
    width = max(len(r) for r in rows)
    ids = np.full((len(rows), width), pad, dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = row
        mask[i, : len(row)] = 1
    return {"input_ids": ids, "attention_mask": mask}


def with_float_types(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with every tensor typed. ONNX shape inference stops at the fused contrib ops
    (SkipLayerNormalization, BiasGelu), and the static quantizer skips every tensor without a type,
    which left most GEMMs float; their outputs are float, and inference carries on from there."""
    import onnx

    model = onnx.shape_inference.infer_shapes(model)
    typed = {v.name for v in (*model.graph.value_info, *model.graph.input, *model.graph.output)}
    for node in model.graph.node:
        if node.domain == "com.microsoft":
            for name in node.output:
                if name and name not in typed:
                    model.graph.value_info.append(
                        onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None)
                    )
    return onnx.shape_inference.infer_shapes(model)


def quantize_int8(
    onnx_path: Path,
    out_path: Path,
    calibration: TextBatches | None = None,
    recipe: Recipe = RECIPES[PUBLISHED],
) -> Path:
    """Quantize the fused fp32 encoder at ``onnx_path`` to int8 at ``out_path``.

    Weights are always per-channel: per-tensor fell to cosine 0.97 and cost more than half a point
    of Banking77 accuracy (ENVIRONMENT.md). A static recipe needs ``calibration``.
    """
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # fused contrib ops carry no inferred types; their tensors are float
    extra: dict[str, object] = {"DefaultTensorType": onnx.TensorProto.FLOAT}
    if not recipe.static:
        quantize_dynamic(
            str(onnx_path), str(out_path), per_channel=True, weight_type=QuantType.QInt8, extra_options=extra
        )
        return out_path
    if calibration is None:
        raise ValueError(f"int8 recipe {recipe.name} is static: it needs calibration texts")

    model = with_float_types(onnx.load(str(onnx_path)))
    kept_float = [
        n.name
        for n in model.graph.node
        if n.op_type == "MatMul" and any(re.search(p, n.name) for p in recipe.float_matmuls)
    ]
    # ORT's symbolic shape inference saves its partial result into the working directory when it
    # cannot infer every shape (it cannot on fused contrib ops): keep that out of the caller's folder.
    target = out_path.resolve()  # before the working directory changes
    with tempfile.TemporaryDirectory(prefix="appliance-int8-") as scratch, contextlib.chdir(scratch):
        _quantize_static(model, target, calibration, recipe, kept_float, extra)
    return out_path


def _quantize_static(
    model: onnx.ModelProto,
    out_path: Path,
    calibration: TextBatches,
    recipe: Recipe,
    kept_float: list[str],
    extra: dict[str, object],
) -> None:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    quantize_static(
        model,
        str(out_path),
        calibration,
        quant_format=QuantFormat.QDQ,
        # the GEMMs carry nearly all the time; layer norms, GELU and softmax stay float
        op_types_to_quantize=["MatMul"],
        nodes_to_exclude=kept_float,
        per_channel=True,
        reduce_range=recipe.reduce_range,
        activation_type=QuantType.QInt8 if recipe.activation_signed else QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        # min/max: the histogram calibrators need every calibration batch to have one shape
        calibrate_method=CalibrationMethod.MinMax,
        extra_options=extra,
    )
