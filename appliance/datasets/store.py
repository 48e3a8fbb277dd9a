"""The dataset store: every training set the factory saw, kept inside the perimeter.

Layout under ``$APPLIANCE_HOME``::

    datasets/<sha256>/rows.jsonl     the rows, canonical JSON lines (sorted keys, UTF-8, one per line)
    datasets/<sha256>/dataset.json   kind, row and label counts, and the names it was stored under

A dataset is named by the sha256 of its ``rows.jsonl`` bytes, so the same rows are stored once and
get the same digest whoever stores them; a model's manifest names its training and golden sets by
digest (``lineage``), so a retrain never needs the original file again. Each name (a model's name)
numbers its distinct datasets 1, 2, ... in the order they were first stored.

A dataset appears through one rename of a fully written folder and disappears the same way
(``remove``, the right to forget): the models trained on it stay, and say that their data is gone.
Everything is private (:mod:`appliance.files`).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import secrets
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from appliance.artifact.spans import Span
from appliance.dataset.records import LabelledData, LabelledRow
from appliance.dataset.spans import SpanData, SpanExample
from appliance.errors import IntegrityError, InvalidArgument, NotFound
from appliance.files import fsync_dir, make_private_dir, private_mode, restrict_tree, write_atomic
from appliance.store import ModelStore

DatasetKind = Literal["classify", "extract"]
Role = Literal["train", "golden", "corrections"]
KINDS: tuple[str, ...] = ("classify", "extract")
ROLES: tuple[str, ...] = ("train", "golden", "corrections")
ROWS_FILE = "rows.jsonl"
INFO_FILE = "dataset.json"
DIGEST_RE = re.compile(r"[0-9a-f]{64}")
MIN_PREFIX = 8  # characters of a digest that name a dataset on the command line
_STAGING_PREFIX = ".staging-"

Row = LabelledRow | SpanExample


@dataclass(frozen=True)
class DatasetRef:
    """A stored dataset as a manifest names it, with the name it was stored under this time."""

    digest: str
    name: str
    role: str
    kind: str
    version: int  # this dataset's number among the name's datasets
    n_rows: int


@dataclass(frozen=True)
class DatasetInfo:
    digest: str
    kind: str
    n_rows: int
    label_counts: dict[str, int]
    created_at: str
    refs: tuple[DatasetRef, ...]  # every (name, role) it was stored under, first first


@dataclass(frozen=True)
class StoredDataset:
    info: DatasetInfo
    rows: list[LabelledRow] | list[SpanExample]

    @property
    def digest(self) -> str:
        return self.info.digest

    def labelled(self) -> LabelledData:
        """A classification set as the factory reads it."""
        if self.info.kind != "classify":
            raise InvalidArgument(f"dataset {self.digest[:12]} holds spans, not labelled texts")
        rows = [r for r in self.rows if isinstance(r, LabelledRow)]
        return LabelledData.of_rows(rows, Path(f"dataset:{self.digest[:12]}"))

    def spans(self) -> SpanData:
        """A span set as the factory reads it."""
        if self.info.kind != "extract":
            raise InvalidArgument(f"dataset {self.digest[:12]} holds labelled texts, not spans")
        rows = [r for r in self.rows if isinstance(r, SpanExample)]
        return SpanData(rows, Path(f"dataset:{self.digest[:12]}"), "spans_jsonl")


def _row_json(row: Row) -> dict[str, object]:
    if isinstance(row, LabelledRow):
        return {"text": row.text, "label": row.label, "origin": row.origin}
    return {
        "text": row.text,
        "spans": [{"label": s.label, "start": s.start, "end": s.end} for s in row.spans],
        "requested_slots": list(row.requested_slots),
    }


def _row(kind: str, data: dict[str, object]) -> Row:
    text = str(data["text"])
    if kind == "classify":
        return LabelledRow(text, str(data["label"]), str(data.get("origin", "train")))
    spans = tuple(
        Span(str(s["label"]), int(s["start"]), int(s["end"]), text[int(s["start"]) : int(s["end"])])
        for s in data["spans"]  # type: ignore[attr-defined]
    )
    return SpanExample(text, spans, tuple(str(x) for x in data.get("requested_slots", [])))  # type: ignore[attr-defined]


def canonical_jsonl(rows: Sequence[Row]) -> bytes:
    """The bytes a dataset is stored as and named by."""
    lines = (
        json.dumps(_row_json(r), sort_keys=True, separators=(",", ":"), ensure_ascii=False) for r in rows
    )
    return "".join(f"{line}\n" for line in lines).encode("utf-8", "surrogatepass")


def _info_bytes(info: dict[str, object]) -> bytes:
    return json.dumps(info, indent=2, ensure_ascii=False).encode()


def _label_counts(rows: Sequence[Row]) -> dict[str, int]:
    counts: Counter[str] = Counter()
    for r in rows:
        if isinstance(r, LabelledRow):
            counts[r.label] += 1
        else:
            counts.update(s.label for s in r.spans)
    return dict(sorted(counts.items()))


class DatasetStore:
    def __init__(self, home: Path) -> None:
        self.home = Path(home)
        self.root = self.home / "datasets"

    # ------------------------------------------------------------------ writing
    def put(self, rows: Sequence[Row], *, name: str, role: str, kind: str) -> DatasetRef:
        """Store ``rows`` (once per content) under ``name`` and ``role``; the same rows, the same digest."""
        if kind not in KINDS:
            raise InvalidArgument(f"dataset kind {kind!r}: use one of {', '.join(KINDS)}")
        if role not in ROLES:
            raise InvalidArgument(f"dataset role {role!r}: use one of {', '.join(ROLES)}")
        wanted = LabelledRow if kind == "classify" else SpanExample
        if any(not isinstance(r, wanted) for r in rows):
            raise InvalidArgument(f"a {kind} dataset holds {wanted.__name__} rows only")
        data = canonical_jsonl(rows)
        digest = hashlib.sha256(data).hexdigest()
        with self._locked():
            if not self.exists(digest):
                info: dict[str, object] = {
                    "digest": digest,
                    "kind": kind,
                    "n_rows": len(rows),
                    "label_counts": _label_counts(rows),
                    "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
                    "refs": [{"name": name, "role": role, "version": self._next_version(name)}],
                }
                self._publish(digest, data, info)
                return self._ref(info, info["refs"][0])  # type: ignore[index]
            info = self._read_info(digest)
            refs: list[dict[str, object]] = list(info["refs"])  # type: ignore[call-overload]
            for ref in refs:
                if ref["name"] == name and ref["role"] == role:
                    return self._ref(info, ref)
            # The same rows under another role keep their number; under a new name they get one.
            known = [int(r["version"]) for r in refs if r["name"] == name]  # type: ignore[call-overload]
            ref = {"name": name, "role": role, "version": known[0] if known else self._next_version(name)}
            info["refs"] = [*refs, ref]
            mode = private_mode(self.root, folder=False)
            write_atomic(self.root / digest / INFO_FILE, _info_bytes(info), mode)
            return self._ref(info, ref)

    def _publish(self, digest: str, data: bytes, info: dict[str, object]) -> None:
        """Write the rows and their description into a staging folder and rename it into place, so
        a dataset is there whole or not at all. Caller holds the lock."""
        staging = Path(tempfile.mkdtemp(prefix=_STAGING_PREFIX, dir=self.root))
        try:
            (staging / ROWS_FILE).write_bytes(data)
            (staging / INFO_FILE).write_bytes(_info_bytes(info))
            restrict_tree(staging, like=self.root)
            for name in (ROWS_FILE, INFO_FILE):
                with (staging / name).open("rb") as handle:
                    os.fsync(handle.fileno())
            os.rename(staging, self.root / digest)
            fsync_dir(self.root)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def remove(self, digest: str) -> DatasetInfo:
        """Delete a dataset (the right to forget); returns what it was. The models trained on it
        keep their manifests, which name a digest the store no longer has."""
        with self._locked():
            info = self.info(digest)
            folder = self.root / info.digest
            doomed = folder.with_name(f"{_STAGING_PREFIX}rm-{secrets.token_hex(4)}")
            os.rename(folder, doomed)  # gone for readers at once, even if the rmtree is interrupted
            shutil.rmtree(doomed)
        return info

    # ------------------------------------------------------------------ reading
    def list(self) -> list[DatasetInfo]:
        if not self.root.is_dir():
            return []
        found = [self.info(p.name) for p in sorted(self.root.iterdir()) if self.exists(p.name)]
        return sorted(found, key=lambda i: (i.created_at, i.digest))

    def exists(self, digest: str) -> bool:
        return bool(DIGEST_RE.fullmatch(digest)) and (self.root / digest / INFO_FILE).is_file()

    def info(self, ref_or_digest: DatasetRef | str) -> DatasetInfo:
        digest = self._digest(ref_or_digest)
        data = self._read_info(digest)
        refs = tuple(self._ref(data, r) for r in data["refs"])  # type: ignore[attr-defined]
        return DatasetInfo(
            digest=digest,
            kind=str(data["kind"]),
            n_rows=int(data["n_rows"]),  # type: ignore[call-overload]
            label_counts=dict(data["label_counts"]),  # type: ignore[call-overload]
            created_at=str(data["created_at"]),
            refs=refs,
        )

    def get(self, ref_or_digest: DatasetRef | str) -> StoredDataset:
        """The dataset's rows, checked against its digest."""
        info = self.info(ref_or_digest)
        raw = (self.root / info.digest / ROWS_FILE).read_bytes()
        if hashlib.sha256(raw).hexdigest() != info.digest:
            raise IntegrityError(f"dataset {info.digest[:12]}: {ROWS_FILE} does not match its digest")
        # Split on newlines only: str.splitlines() would also cut a text at U+2028 and its kin.
        lines = raw.decode("utf-8", "surrogatepass").split("\n")[:-1]
        rows = [_row(info.kind, json.loads(line)) for line in lines]
        return StoredDataset(info, rows)  # type: ignore[arg-type]

    def golden_for(self, model: str, models: ModelStore | None = None) -> StoredDataset | None:
        """The golden set of the version a bare ``model`` serves, from its manifest's lineage; None
        when that version names none or it was deleted."""
        models = models or ModelStore(self.home)
        manifest = models.load(f"{model}:{models.served_version(model)}", verify=False)
        lineage = manifest.spec.lineage
        if lineage is None or lineage.golden_dataset is None or not self.exists(lineage.golden_dataset):
            return None
        return self.get(lineage.golden_dataset)

    # ------------------------------------------------------------------ helpers
    def _digest(self, ref_or_digest: DatasetRef | str) -> str:
        if isinstance(ref_or_digest, DatasetRef):
            wanted = ref_or_digest.digest
        else:
            wanted = ref_or_digest.strip().lower()
        if DIGEST_RE.fullmatch(wanted):
            if not (self.root / wanted / INFO_FILE).is_file():
                raise NotFound(f"no dataset {wanted[:12]} in {self.root} (deleted, or never stored here)")
            return wanted
        if len(wanted) < MIN_PREFIX or not re.fullmatch(r"[0-9a-f]+", wanted):
            raise InvalidArgument(
                f"dataset {ref_or_digest!r}: give its sha256 or at least {MIN_PREFIX} hex digits of it"
            )
        matches = [p.name for p in self.root.glob(f"{wanted}*") if DIGEST_RE.fullmatch(p.name)]
        if not matches:
            raise NotFound(f"no dataset starting {wanted} in {self.root}")
        if len(matches) > 1:
            raise InvalidArgument(f"{wanted} names {len(matches)} datasets; give more digits")
        return matches[0]

    def _read_info(self, digest: str) -> dict[str, object]:
        try:
            data: dict[str, object] = json.loads((self.root / digest / INFO_FILE).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise IntegrityError(f"dataset {digest[:12]}: unreadable {INFO_FILE} ({exc})") from exc
        return data

    def _ref(self, info: dict[str, object], ref: dict[str, object]) -> DatasetRef:
        return DatasetRef(
            digest=str(info["digest"]),
            name=str(ref["name"]),
            role=str(ref["role"]),
            kind=str(info["kind"]),
            version=int(ref["version"]),  # type: ignore[call-overload]
            n_rows=int(info["n_rows"]),  # type: ignore[call-overload]
        )

    def _next_version(self, name: str) -> int:
        """One more than the highest number ``name`` gave a dataset. Caller holds the lock."""
        numbers = [r.version for i in self.list() for r in i.refs if r.name == name]
        return max(numbers, default=0) + 1

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """One writer at a time across processes: the read-modify-write of ``dataset.json``."""
        make_private_dir(self.root)
        lock = self.root / ".lock"
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, private_mode(self.root, folder=False))
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)
