"""Span extraction, defined once for the factory and for serving: the BIO tag scheme over word
pieces, the encoding of a text (with its optional requested-slot context), the token head and the
decoding of tag probabilities back into character spans of the text as sent.

Offsets are Python string indices (code points) into the text, end exclusive: what the tokenizer's
offset mapping gives for each word piece, so multi-byte characters and emoji count as one.

A text is encoded as ``[CLS] text [SEP]``, or with a requested-slot context as the first segment of
a pair, ``[CLS] requested: people [SEP] text [SEP]``, so that the text's word pieces keep offsets
into the text. Only text pieces get a tag; special and context pieces have the offset -1.

Confidence: a span's is the lowest probability of the tag chosen for any of its word pieces; a
text's is the lowest over all of its word pieces (an ``O`` chosen with doubt may hide a missed span).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from appliance.artifact.maths import head_probs, truncate

if TYPE_CHECKING:
    from tokenizers import Encoding, Tokenizer

TAGGER_FILE = "tagger.npz"
OUTSIDE = "O"
NO_OFFSET = -1
CONTEXT_PREFIX = "requested: "


@dataclass(frozen=True)
class Span:
    label: str
    start: int  # character offset into the text as sent
    end: int  # exclusive
    text: str
    confidence: float = 1.0


def tag_names(labels: Sequence[str]) -> list[str]:
    """``["O", "B-<l1>", "I-<l1>", "B-<l2>", ...]``: tag ``1 + 2k`` begins label k, ``2 + 2k`` continues."""
    return [OUTSIDE, *(f"{prefix}-{label}" for label in labels for prefix in ("B", "I"))]


def context_text(requested_slots: Sequence[str]) -> str | None:
    """The first segment for a text asked for these slots; None without any."""
    return CONTEXT_PREFIX + ", ".join(requested_slots) if requested_slots else None


@dataclass(frozen=True)
class Encoded:
    ids: list[int]
    attention: list[int]
    offsets: np.ndarray  # [T, 2] int64: (start, end) of each text word piece, -1 for the others
    truncated: bool

    def __len__(self) -> int:
        return len(self.ids)


def _from_encoding(encoding: Encoding, text_segment: int, window: int) -> Encoded:
    ids, cut = truncate(encoding.ids, window)
    offsets = np.full((len(encoding.ids), 2), NO_OFFSET, dtype=np.int64)
    for i, (segment, (start, end)) in enumerate(zip(encoding.sequence_ids, encoding.offsets, strict=True)):
        if segment == text_segment and end > start:
            offsets[i] = (start, end)
    if cut:  # the same cut as the ids: the head and the closing [SEP]
        offsets = np.concatenate([offsets[: window - 1], offsets[-1:]])
    return Encoded(ids, [1] * len(ids), offsets, cut)


def encode_for_extraction(
    tokenizer: Tokenizer, text: str, requested_slots: Sequence[str] = (), window: int = 128
) -> Encoded:
    """One text's word pieces, cut to ``window`` (the text segment loses its tail, never the context).

    ``tokenizer`` must have padding and truncation off (``no_padding()``, ``no_truncation()``).
    """
    return encode_many(tokenizer, [text], [requested_slots], window)[0]


def encode_many(
    tokenizer: Tokenizer,
    texts: Sequence[str],
    requested_slots: Sequence[Sequence[str]] | None = None,
    window: int = 128,
) -> list[Encoded]:
    """:func:`encode_for_extraction` for many texts, tokenized in one batch call."""
    slots = requested_slots if requested_slots is not None else [()] * len(texts)
    if len(slots) != len(texts):
        raise ValueError(f"{len(texts)} texts but {len(slots)} requested-slot lists")
    contexts = [context_text(s) for s in slots]
    inputs = [text if ctx is None else (ctx, text) for text, ctx in zip(texts, contexts, strict=True)]
    encodings = tokenizer.encode_batch(inputs)
    return [
        _from_encoding(enc, 0 if ctx is None else 1, window)
        for enc, ctx in zip(encodings, contexts, strict=True)
    ]


def bio_targets(offsets: np.ndarray, spans: Sequence[Span], labels: Sequence[str]) -> np.ndarray:
    """Tag ids ``[T]`` for training: the first word piece overlapping a span begins it, the others
    continue it; pieces outside every span (and special pieces) are ``O``."""
    index = {label: k for k, label in enumerate(labels)}
    tags = np.zeros(len(offsets), dtype=np.int64)
    for span in spans:
        k = index[span.label]
        inside = (offsets[:, 0] >= 0) & (offsets[:, 0] < span.end) & (offsets[:, 1] > span.start)
        positions = np.flatnonzero(inside)
        if len(positions):
            tags[positions] = 2 + 2 * k
            tags[positions[0]] = 1 + 2 * k
    return tags


def decode_spans(tag_probs: np.ndarray, offsets: np.ndarray, text: str, labels: Sequence[str]) -> list[Span]:
    """Spans from per-piece tag probabilities ``[T, 1 + 2 * len(labels)]``.

    Each text piece takes its most probable tag. ``B-l`` starts a span of l; ``I-l`` continues an open
    span of l or, without one, starts a span; anything else closes it. A span runs from its first
    piece's start to its last piece's end, with outer whitespace stripped.
    """
    chosen = tag_probs.argmax(axis=-1)
    spans: list[Span] = []
    current: tuple[int, int, int, float] | None = None  # label index, start, end, confidence

    def close() -> None:
        if current is not None:
            k, start, end, conf = current
            span = _stripped(text, labels[k], start, end, conf)
            if span is not None:
                spans.append(span)

    for t in range(len(offsets)):
        start, end = int(offsets[t, 0]), int(offsets[t, 1])
        if start < 0:
            continue
        tag = int(chosen[t])
        p = float(tag_probs[t, tag])
        if tag == 0:
            close()
            current = None
            continue
        k, begins = (tag - 1) // 2, (tag - 1) % 2 == 0
        if current is not None and not begins and current[0] == k:
            current = (k, current[1], end, min(current[3], p))
        else:
            close()
            current = (k, start, end, p)
    close()
    return spans


def _stripped(text: str, label: str, start: int, end: int, confidence: float) -> Span | None:
    piece = text[start:end]
    left = len(piece) - len(piece.lstrip())
    right = len(piece.rstrip())
    if right <= left:
        return None
    return Span(label, start + left, start + right, piece[left:right], confidence)


def text_confidence(tag_probs: np.ndarray, offsets: np.ndarray) -> float:
    """The lowest chosen-tag probability over the text's pieces (1.0 for a text without pieces)."""
    mask = offsets[:, 0] >= 0
    if not mask.any():
        return 1.0
    return float(tag_probs[mask].max(axis=-1).min())


@dataclass(frozen=True)
class TokenHead:
    """A linear layer over each word piece's last hidden state, softmaxed over the tags."""

    weight: np.ndarray  # [n_tags, D] float32
    bias: np.ndarray  # [n_tags] float32

    def probs(self, states: np.ndarray) -> np.ndarray:
        """Tag probabilities ``[T, n_tags]`` for the states ``[T, D]`` of one text (or ``[B, T, D]``)."""
        return head_probs(states, self.weight, self.bias)

    def save(self, folder: Path) -> Path:
        path = folder / TAGGER_FILE
        with path.open("wb") as handle:
            np.savez(handle, weight=self.weight, bias=self.bias)
        return path

    @classmethod
    def load(cls, folder: Path, file: str = TAGGER_FILE) -> TokenHead:
        with np.load(folder / file, allow_pickle=False) as data:
            return cls(data["weight"].astype(np.float32), data["bias"].astype(np.float32))
