"""A manifest exactly as the factory wrote it before ``schema_version`` (no columns, no lineage).

The structure is copied from a store published by that code; only the label set is shorter.
"""

from __future__ import annotations

from typing import Any

LABELS = ["card_arrival", "change_pin", "exchange_rate"]
FP32_ID = "3889336747313a35d8155d6decad408195d0fe8ed0d202bf60c1fa5163b8e27a"
INT8_ID = "525eace0fab31791e1437cabc287f5650bb0a94b7b8faaacc656b05332e38db7"


def _fingerprint(per_label: int, sha256: str) -> dict[str, Any]:
    return {
        "label_counts": dict.fromkeys(LABELS, per_label),
        "n_labels": len(LABELS),
        "n_rows": per_label * len(LABELS),
        "sha256": sha256,
    }


def old_fields() -> dict[str, Any]:
    """What pipeline.train passed to ``Staging.commit``."""
    return {
        "kind": "classifier",
        "mode": "head",
        "labels": list(LABELS),
        "label_descriptions": {},
        "encoder": {"id": INT8_ID, "precision": "int8", "window": 256, "dim": 384},
        "encoders": {"fp32": FP32_ID, "int8": INT8_ID},
        "base_encoder": {
            "name": "model",
            "sha256": "43901a645f4d8500a762f1ef9674608b19d3c56538ec475ff04598ba4956d231",
        },
        "precision": "int8",
        "head": {"file": "head.npz", "regularisation_C": 30.0},
        "metrics": {
            "n": 60,
            "accuracy": 0.99375,
            "macro_f1": 0.9937460913070669,
            "ece": 0.04025668259710074,
            "threshold": 0.36069250106811523,
            "coverage_at_threshold": 1.0,
            "precision_at_threshold": 0.99375,
        },
        "calibration": {
            "target_precision": 0.99,
            "threshold": 0.36069250106811523,
            "coverage": 1.0,
            "precision": 0.99375,
        },
        "quantization": {
            "fp32_accuracy": 0.9875,
            "int8_accuracy": 0.99375,
            "drop_points": -0.6249999999999978,
            "max_drop_points": 0.5,
            "decision": "int8",
            "reason": "int8 held-out accuracy is 0.62 points above fp32 (gate: at most 0.5 points below); "
            "int8 published",
        },
        "default_policy": "cascade",
        "finetune": None,
        "data": {
            "train": _fingerprint(40, "63b336334fc6fdd9396a3c6ab88c5a2f5b118136c34ba2d4eecddd1f365e3824"),
            "heldout": _fingerprint(20, "18fcc19d4bbab3700369165f3548db98d98f8ae98939ced0412e0a9d46346db5"),
            "heldout_source": "eval file",
        },
    }


def old_manifest() -> dict[str, Any]:
    """The published manifest.json: the fields plus what ``Staging.commit`` added."""
    return {
        **old_fields(),
        "format": 1,
        "name": "b8",
        "version": 1,
        "created_at": "2026-12-01T10:01:34+00:00",
        "files": {
            "MODEL_CARD.md": "f77c7cc545738d47d3be7e773a558824a1e3033a372b69ad4332fdc15035d992",
            "head.npz": "3cc9ccdab832a9e69aca6f647d696e4317835983a4f91ee040997d6e4a9d9dae",
            "report.json": "d2b6e2df410ad0fbfd4e2c38711701d0c01bf6f5fd498c5be19bf3ecfc20ac84",
        },
    }
