"""The model card published with every specialist (MODEL_CARD.md)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from appliance.artifact.manifest import SpecialistFields
    from appliance.dataset import DataWarning
    from appliance.factory.evaluate import Report
    from appliance.factory.pipeline import TrainSpec

CARD_FILE = "MODEL_CARD.md"


def _pct(x: float) -> str:
    return "n/a" if x != x else f"{100 * x:.2f}%"  # x != x: NaN


def render(
    spec: TrainSpec,
    fields: SpecialistFields,
    report: Report,
    warnings: list[DataWarning],
    timings: dict[str, float],
) -> str:
    cal = report.calibration
    quant = fields.quantization
    train_fp = fields.data.train
    mode = (
        "frozen shared encoder + linear head" if spec.mode == "head" else "fine-tuned encoder + linear head"
    )
    base, enc = fields.base_encoder, fields.encoder
    lines = [
        f"# Model card: {spec.name}",
        "",
        "## What it does",
        f"Classifies a text into one of {len(fields.labels)} labels. It is a specialist trained on the "
        "customer's own labelled history; uncertain decisions are meant for the cascade's generalist.",
        "",
        "## How it was built",
        f"- Mode: `{spec.mode}` ({mode})",
        f"- Base encoder: `{base.name}` (sha256 `{base.sha256[:16]}…`)",
        f"- Encoder artifact: `{enc.id[:16]}…`, window {enc.window} tokens, dimension {enc.dim}",
        f"- Training data: {train_fp.n_rows} rows, {train_fp.n_labels} labels, "
        f"fingerprint `{train_fp.sha256[:16]}…` (the data itself is not stored)",
        f"- Held-out data: {fields.data.heldout_source}, {report.n} rows",
        f"- Training wall time: {timings.get('total', 0.0):.1f} s",
        "",
        "## Precision",
        f"Published as **{fields.precision}**. {quant.reason}.",
        f"fp32 held-out accuracy {_pct(quant.fp32_accuracy)}, int8 {_pct(quant.int8_accuracy)}.",
        "",
        "## Held-out results",
        "| metric | value |",
        "|---|---|",
        f"| accuracy | {_pct(report.accuracy)} |",
        f"| macro-F1 | {_pct(report.macro_f1)} |",
        f"| expected calibration error | {report.ece:.4f} |",
        f"| confidence threshold for precision ≥ {cal.target_precision} | {cal.threshold:.4f} |",
        f"| coverage at that threshold (automation rate) | {_pct(cal.coverage)} |",
        f"| precision at that threshold | {_pct(cal.precision)} |",
        "",
        "### Most confused label pairs",
        "| true | predicted | count |",
        "|---|---|---|",
        *(f"| {p['true']} | {p['predicted']} | {p['count']} |" for p in report.confused_pairs),
        "",
        "### Weakest labels (F1)",
        "| label | precision | recall | F1 | support |",
        "|---|---|---|---|---|",
        *(
            f"| {label} | {m['precision']:.3f} | {m['recall']:.3f} | {m['f1']:.3f} | {int(m['support'])} |"
            for label, m in sorted(report.per_class.items(), key=lambda kv: kv[1]["f1"])[:10]
        ),
        "",
        "## Data warnings at training time",
        *([f"- {w.message}" for w in warnings] or ["- none"]),
        "",
        "## Intended use and limits",
        "- Route or label texts like the training data. Texts in other languages or domains will be "
        "classified with unreliable confidence: keep the cascade policy on.",
        f"- Texts longer than {fields.encoder.window} word pieces are truncated (flagged per result).",
        "- The threshold was calibrated on the held-out data above; re-check it when traffic drifts.",
        "",
    ]
    return "\n".join(lines)
