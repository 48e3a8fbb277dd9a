"""Warnings about a loaded data set that do not stop training: duplicates, conflicting labels,
imbalance, long texts and spreadsheet formulas."""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Sequence

from appliance.dataset.records import EXAMPLES, DataWarning, LabelledData, normalized

IMBALANCE_RATIO = 10.0
# About 400-500 word pieces: past the encoder's input window, so the tail is cut off.
LONG_TEXT_CHARS = 2000
# Leading characters that make spreadsheet programs read a cell as a formula (OWASP, CSV injection).
FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")


def is_formula_like(cell: str) -> bool:
    """Whether a spreadsheet program would read this cell as a formula."""
    return cell.startswith(FORMULA_PREFIXES)


def escape_csv_cell(cell: str) -> str:
    """Make a cell safe to open in a spreadsheet: a leading quote turns a formula into text (OWASP)."""
    return "'" + cell if is_formula_like(cell) else cell


def inspect_data(
    data: LabelledData,
    *,
    imbalance_ratio: float = IMBALANCE_RATIO,
    long_text_chars: int = LONG_TEXT_CHARS,
) -> list[DataWarning]:
    """Warnings for a loaded data set: duplicates, conflicting labels, imbalance, long texts, formulas."""
    warnings: list[DataWarning] = []

    unit = "line" if data.location_kind == "line" else "row"

    def where(indices: Sequence[int]) -> tuple[str, list[int]]:
        shown = [data.locations[i] for i in indices[:EXAMPLES]]
        return f"{unit}s {', '.join(map(str, shown))}", shown

    by_text: dict[str, list[int]] = defaultdict(list)
    for i, text in enumerate(data.texts):
        by_text[normalized(text)].append(i)
    repeated = [idx for idx in by_text.values() if len(idx) > 1]

    seen_pairs: dict[tuple[str, str], int] = {}
    duplicate_rows: list[int] = []  # rows repeating an earlier (text, label)
    duplicate_examples: list[int] = []  # the earlier row then the repeat, for each of a few pairs
    for idx in repeated:
        for i in idx:
            key = (normalized(data.texts[i]), data.labels[i])
            if key in seen_pairs:
                duplicate_rows.append(i)
                if len(duplicate_examples) < 2 * EXAMPLES:
                    duplicate_examples += [seen_pairs[key], i]
            else:
                seen_pairs[key] = i
    if duplicate_rows:
        pairs = list(zip(duplicate_examples[::2], duplicate_examples[1::2], strict=True))
        shown = "; ".join(f"{unit} {data.locations[b]} repeats {unit} {data.locations[a]}" for a, b in pairs)
        warnings.append(
            DataWarning(
                "duplicates",
                f"{len(duplicate_rows)} row(s) repeat an earlier row's text and label (e.g. {shown})",
                [data.locations[b] for _, b in pairs],
            )
        )

    conflicting = [idx for idx in repeated if len({data.labels[i] for i in idx}) > 1]
    if conflicting:
        examples = [
            f"{where(idx)[0]}: {', '.join(sorted({data.labels[i] for i in idx}))}"
            for idx in conflicting[:EXAMPLES]
        ]
        warnings.append(
            DataWarning(
                "conflicting_labels",
                f"{len(conflicting)} text(s) appear with different labels ({'; '.join(examples)})",
                [data.locations[idx[0]] for idx in conflicting[:EXAMPLES]],
            )
        )

    counts = sorted(Counter(data.labels).items(), key=lambda kv: (-kv[1], kv[0]))
    if counts:
        (big, n_big), n_small = counts[0], counts[-1][1]
        if n_big / n_small > imbalance_ratio:
            rare = [(label, n) for label, n in counts[::-1] if n_big / n > imbalance_ratio]
            smallest = ", ".join(f"{label!r} ({n})" for label, n in rare[:EXAMPLES])
            more = f" and {len(rare) - EXAMPLES} more" if len(rare) > EXAMPLES else ""
            warnings.append(
                DataWarning(
                    "imbalance",
                    f"classes are imbalanced {n_big / n_small:.1f}:1 (above {imbalance_ratio:g}:1): "
                    f"largest {big!r} ({n_big}); {len(rare)} class(es) are over {imbalance_ratio:g} times "
                    f"smaller: {smallest}{more}",
                )
            )

    long = [i for i, text in enumerate(data.texts) if len(text) > long_text_chars]
    if long:
        shown, locs = where(long)
        warnings.append(
            DataWarning(
                "long_texts",
                f"{len(long)} text(s) are longer than {long_text_chars} characters and will be cut to the "
                f"encoder's input window (e.g. {shown})",
                locs,
            )
        )

    formulas = [
        i
        for i, (t, lab) in enumerate(zip(data.texts, data.labels, strict=True))
        if is_formula_like(t) or is_formula_like(lab)
    ]
    if formulas:
        shown, locs = where(formulas)
        warnings.append(
            DataWarning(
                "formula_cells",
                f"{len(formulas)} cell(s) start with = + - @ or a control character and would run as "
                f"formulas in a spreadsheet; they are kept as plain text and escaped when exported "
                f"(e.g. {shown})",
                locs,
            )
        )
    return warnings
