"""The model card published with every specialist (MODEL_CARD.md): classifiers and span extractors."""

from __future__ import annotations

from typing import TYPE_CHECKING

from appliance.factory.gate_rule import GateConfig
from appliance.factory.gate_rule import describe as describe_gate

if TYPE_CHECKING:
    from appliance.artifact.manifest import SpecialistFields
    from appliance.dataset import DataWarning
    from appliance.factory.evaluate import Report
    from appliance.factory.extract import ExtractSpec
    from appliance.factory.extract_eval import SpanReport
    from appliance.factory.pipeline import TrainSpec

CARD_FILE = "MODEL_CARD.md"


def _pct(x: float) -> str:
    return "n/a" if x != x else f"{100 * x:.2f}%"  # x != x: NaN


def _self_check_lines(fields: SpecialistFields) -> list[str]:
    check = fields.self_check
    if check is None:
        return []
    return [
        "",
        "## Self-check on every server",
        f"{check.n} held-out texts with this version's labels ship in `{check.file}`. Checked on a CPU "
        f"with {check.factory_cpu}: {_pct(check.factory_accuracy)} accurate, {fields.precision} agreeing "
        f"with fp32 on {_pct(check.factory_fp32_agreement)}. A server refuses this version when it "
        f"agrees with these labels on less than {_pct(check.min_agreement)} of the texts; "
        "`appliance models verify` runs the check.",
    ]


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
        *_self_check_lines(fields),
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
        "## Promotion",
        "A later version replaces the serving one only through `appliance gate NAME:VERSION` and "
        f"`appliance promote`. The gate's defaults: {describe_gate(GateConfig())}; set them in "
        "`$APPLIANCE_HOME/loop/policy.json` (auto-promotion on a pass is off by default).",
        "",
    ]
    return "\n".join(lines)


def render_extractor(
    spec: ExtractSpec,
    fields: SpecialistFields,
    report: SpanReport,
    warnings: list[DataWarning],
    timings: dict[str, float],
) -> str:
    """The card of a span extractor: how it was built, span F1 per slot, the threshold, int8."""
    cal, quant, train_fp = report.calibration, fields.quantization, fields.data.train
    base, enc = fields.base_encoder, fields.encoder
    uses_context = fields.extractor is not None and fields.extractor.uses_context
    mode = "frozen shared encoder + token head" if spec.mode == "head" else "fine-tuned encoder + token head"
    text_cov = cal.text_coverage if cal.text_coverage is not None else float("nan")
    lines = [
        f"# Model card: {spec.name}",
        "",
        "## What it does",
        f"Extracts spans of {len(fields.labels)} slots ({', '.join(fields.labels)}) from a text, each with "
        "its character offsets and a confidence. Spans below the threshold are meant for the cascade.",
        "",
        "## How it was built",
        f"- Mode: `{spec.mode}` ({mode}), BIO tags over word pieces",
        f"- Requested-slot context: {'used (first segment of the input)' if uses_context else 'not present'}",
        f"- Base encoder: `{base.name}` (sha256 `{base.sha256[:16]}…`)",
        f"- Encoder artifact: `{enc.id[:16]}…`, window {enc.window} tokens, dimension {enc.dim}",
        f"- Training data: {train_fp.n_rows} texts, spans per slot {train_fp.label_counts}, "
        f"fingerprint `{train_fp.sha256[:16]}…` (the data itself is not stored)",
        f"- Held-out data: {fields.data.heldout_source}, {report.n_texts} texts",
        f"- Training wall time: {timings.get('total', 0.0):.1f} s",
        "",
        "## Precision",
        f"Published as **{fields.precision}**. {quant.reason}.",
        f"fp32 held-out span F1 {_pct(quant.fp32_accuracy)}, int8 {_pct(quant.int8_accuracy)}.",
        "",
        "## Held-out results (exact span match)",
        "| slot | precision | recall | F1 | gold spans |",
        "|---|---|---|---|---|",
        *(
            f"| {label} | {m.precision:.3f} | {m.recall:.3f} | {m.f1:.3f} | {m.support} |"
            for label, m in [("**micro**", report.micro), *report.per_slot.items()]
        ),
        "",
        f"- Texts whose spans are all exactly right: {_pct(report.exact_texts)}",
        f"- Span confidence threshold for precision ≥ {cal.target_precision}: {cal.threshold:.4f}; "
        f"spans at or above it {_pct(cal.coverage)} (precision {_pct(cal.precision)}), "
        f"whole texts {_pct(text_cov)}",
        "",
        "### Most frequent boundary errors",
        "| slot | kind | gold | predicted | count |",
        "|---|---|---|---|---|",
        *(
            f"| {e['label']} | {e['kind']} | {e['gold']!r} | {e['predicted']!r} | {e['count']} |"
            for e in report.boundary_errors
        ),
        "",
        "## Data warnings at training time",
        *([f"- {w.message}" for w in warnings] or ["- none"]),
        "",
        "## Intended use and limits",
        "- Extract the slots above from texts like the training data; keep the cascade policy on elsewhere.",
        f"- Texts longer than {enc.window} word pieces are truncated: no span is found past the cut.",
        "- Offsets are characters (code points) of the text as sent.",
        "",
    ]
    return "\n".join(lines)
