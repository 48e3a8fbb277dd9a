"""Splitting a data set (stratified hold-out, few-shot subsets) and fingerprinting it."""

from __future__ import annotations

import hashlib
import json
import random
from collections import defaultdict

from appliance.dataset.records import LabelledData, normalized


def _label_rng(seed: int, label: str) -> random.Random:
    # One generator per label: a label's draw does not shift when other labels change.
    return random.Random(f"{seed}\x00{label}")


def stratified_split(
    data: LabelledData, fraction: float = 0.1, seed: int = 0
) -> tuple[LabelledData, LabelledData]:
    """Split into (train, heldout), per label, deterministically for a given seed.

    About ``fraction`` of each label's rows are held out, and a label with at least 2 rows keeps at
    least 1 on each side. Rows with the same (normalised) text stay on one side where the label has
    at least 2 distinct texts, so a duplicate cannot inflate held-out accuracy. Both sides keep
    file order.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must be between 0 and 1, got {fraction}")
    by_label: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(list))
    for i, (text, label) in enumerate(zip(data.texts, data.labels, strict=True)):
        by_label[label][normalized(text)].append(i)
    heldout: list[int] = []
    for label in sorted(by_label):
        groups = [by_label[label][t] for t in sorted(by_label[label])]
        n = sum(len(g) for g in groups)
        if n < 2:
            continue
        if len(groups) == 1:  # one text repeated: split its copies
            groups = [[i] for i in groups[0]]
        target = min(max(1, round(n * fraction)), n - 1)
        rng = _label_rng(seed, label)
        rng.shuffle(groups)
        taken = 0
        for g in groups[:-1]:  # the last group always stays in train
            if taken >= target:
                break
            heldout += g
            taken += len(g)
    held = set(heldout)
    train = [i for i in range(len(data)) if i not in held]
    return data.subset(train), data.subset(sorted(held))


def few_shot(data: LabelledData, per_label: int, seed: int = 0) -> LabelledData:
    """``per_label`` rows of each label (all of them where a label has fewer), in file order.

    Distinct texts are preferred, so a few-shot set is not wasted on duplicates.
    """
    if per_label < 1:
        raise ValueError(f"per_label must be at least 1, got {per_label}")
    by_label: dict[str, list[int]] = defaultdict(list)
    for i, label in enumerate(data.labels):
        by_label[label].append(i)
    chosen: list[int] = []
    for label in sorted(by_label):
        idx = by_label[label][:]
        _label_rng(seed, label).shuffle(idx)
        seen: set[str] = set()
        unique: list[int] = []
        repeats: list[int] = []
        for i in idx:
            text = normalized(data.texts[i])
            (repeats if text in seen else unique).append(i)
            seen.add(text)
        chosen += (unique + repeats)[:per_label]
    return data.subset(sorted(chosen))


def fingerprint(data: LabelledData) -> dict[str, object]:
    """Identify a data set without revealing its texts: a sha256 over the normalised (text, label)
    pairs that ignores row order, plus sizes and label counts."""
    rows = sorted(
        hashlib.sha256(json.dumps([normalized(t), lab]).encode()).digest()
        for t, lab in zip(data.texts, data.labels, strict=True)
    )
    digest = hashlib.sha256()
    for row in rows:
        digest.update(row)
    counts = data.label_counts()
    return {
        "sha256": digest.hexdigest(),
        "n_rows": len(data),
        "n_labels": len(counts),
        "label_counts": counts,
    }
