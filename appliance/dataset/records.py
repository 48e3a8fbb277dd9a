"""The records every stage of data handling shares: the loaded rows, the error that names every
problem, the warnings, and the text normalisation used for duplicates and fingerprints."""

from __future__ import annotations

import functools
import unicodedata
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from appliance.errors import InvalidArgument

EXAMPLES = 3  # example locations quoted in one message


class DataError(InvalidArgument, ValueError):
    """The file cannot be used for training; ``str()`` lists every problem, one ``path:location:`` line each.

    ``location`` is a 1-based line number for CSV/JSONL, ``"row N"`` for Parquet, or ``None`` for a
    problem with the file as a whole. ``problems`` holds every ``(location, reason)`` reported.
    """

    def __init__(
        self,
        path: Path | str,
        location: int | str | None,
        reason: str,
        *,
        problems: Sequence[tuple[int | str | None, str]] = (),
        total: int | None = None,
    ) -> None:
        self.path = Path(path)
        self.location = location
        self.reason = reason
        self.problems = list(problems) or [(location, reason)]
        self.total = total if total is not None else len(self.problems)
        lines = [locate(self.path, loc) + f" {why}" for loc, why in self.problems]
        if self.total > len(self.problems):
            lines.append(f"({self.total} problems in all; the first {len(self.problems)} are shown)")
        super().__init__("\n".join(lines))

    def __reduce__(self) -> tuple[object, ...]:
        # Training may run in another process; the default exception pickling would lose the keywords.
        rebuild = functools.partial(DataError, problems=self.problems, total=self.total)
        return (rebuild, (self.path, self.location, self.reason))


def locate(path: Path, location: int | str | None) -> str:
    return f"{path}:" if location is None else f"{path}:{location}:"


@dataclass(frozen=True)
class DataWarning:
    """Something worth a look that does not stop training. ``kind`` is stable; ``message`` is for people."""

    kind: str  # duplicates | conflicting_labels | imbalance | long_texts | formula_cells
    message: str
    locations: list[int] = field(default_factory=list)  # a few example lines/rows


@dataclass(frozen=True)
class LabelledRow:
    """One labelled text, with where its label came from (``train``, ``correction:human:alice``,
    ``generalist``): the dataset store's row of a classification set."""

    text: str
    label: str
    origin: str = "train"


@dataclass(frozen=True)
class LabelledData:
    """Kept rows, in file order. ``locations[i]`` is row i's 1-based line (CSV/JSONL) or row (Parquet)."""

    texts: list[str]
    labels: list[str]
    source: Path
    locations: list[int]
    location_kind: str = "line"  # "line" | "row"
    warnings: list[DataWarning] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.texts)

    def label_counts(self) -> dict[str, int]:
        """Examples per label, labels sorted."""
        return dict(sorted(Counter(self.labels).items()))

    @property
    def label_names(self) -> list[str]:
        return sorted(set(self.labels))

    def where(self, i: int) -> str:
        """Row i's place in the source, e.g. ``train.csv:17`` or ``train.parquet:row 17``."""
        return locate(self.source, self.location(self.locations[i])).rstrip(":")

    def subset(self, indices: Iterable[int]) -> LabelledData:
        """The given rows, in the given order; warnings are not carried over."""
        idx = list(indices)
        return LabelledData(
            texts=[self.texts[i] for i in idx],
            labels=[self.labels[i] for i in idx],
            source=self.source,
            locations=[self.locations[i] for i in idx],
            location_kind=self.location_kind,
        )

    def rows(self, origin: str = "train") -> list[LabelledRow]:
        return [LabelledRow(t, x, origin) for t, x in zip(self.texts, self.labels, strict=True)]

    @classmethod
    def of_rows(cls, rows: Sequence[LabelledRow], source: Path) -> LabelledData:
        """Rows as the factory's data set; a row's location is its 1-based position in ``rows``."""
        return cls(
            texts=[r.text for r in rows],
            labels=[r.label for r in rows],
            source=source,
            locations=list(range(1, len(rows) + 1)),
            location_kind="row",
        )

    def location(self, n: int) -> int | str:
        """A stored location as messages show it: the line number, or ``row N`` for Parquet."""
        return n if self.location_kind == "line" else f"row {n}"


def normalized(text: str) -> str:
    """The form used for duplicates and the fingerprint: NFC, unified line ends, outer space trimmed."""
    return unicodedata.normalize("NFC", text.replace("\r\n", "\n")).strip()
