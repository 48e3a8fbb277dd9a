"""The span contract (appliance.artifact.spans): offsets through the tokenizer with multi-byte text
and emoji, the requested-slot context, truncation, BIO targets and decoding, the token head file,
span-level scores and the manifest's extractor fields."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError
from tokenizers import Tokenizer

from appliance.artifact.manifest import ExtractorInfo, SlotScores, SpanFormat, TaggerInfo
from appliance.artifact.spans import (
    Span,
    TokenHead,
    bio_targets,
    decode_spans,
    encode_for_extraction,
    encode_many,
    tag_names,
    text_confidence,
)
from appliance.factory.extract_eval import evaluate_spans, precision_at
from appliance.factory.pipeline import default_base

LABELS = ["date", "name", "people"]


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    tok = Tokenizer.from_file(str(default_base() / "tokenizer.json"))
    tok.no_padding()
    tok.no_truncation()
    return tok


def one_hot(tags: np.ndarray, n_tags: int, p: float = 1.0) -> np.ndarray:
    probs = np.full((len(tags), n_tags), (1.0 - p) / (n_tags - 1))
    probs[np.arange(len(tags)), tags] = p
    return probs


def test_tag_names() -> None:
    assert tag_names(["a", "b"]) == ["O", "B-a", "I-a", "B-b", "I-b"]


def test_offsets_point_into_the_text_with_multibyte_characters_and_emoji(tokenizer: Tokenizer) -> None:
    text = "Tisch für 4 🍕 am 3. Mai — Name Zoë Müller, 東京"
    enc = encode_for_extraction(tokenizer, text)
    pieces = [text[s:e] for s, e in enc.offsets.tolist() if s >= 0]
    assert "🍕" in pieces and "Zoë" in pieces and "Müller" in pieces and "東" in pieces
    assert enc.offsets[0].tolist() == [-1, -1] and enc.offsets[-1].tolist() == [-1, -1]  # [CLS], [SEP]
    assert not enc.truncated and enc.attention == [1] * len(enc.ids)


def test_the_context_is_a_first_segment_and_text_offsets_stay_in_the_text(tokenizer: Tokenizer) -> None:
    text = "just 4 of us"
    plain = encode_for_extraction(tokenizer, text)
    with_context = encode_for_extraction(tokenizer, text, ["people"])
    assert len(with_context) > len(plain)
    text_rows = with_context.offsets[with_context.offsets[:, 0] >= 0]
    assert text_rows.tolist() == plain.offsets[plain.offsets[:, 0] >= 0].tolist()
    assert tokenizer.decode(with_context.ids[: len(with_context) - len(plain) + 1]).startswith(
        "requested : people"
    )


def test_truncation_cuts_the_text_and_keeps_the_context_and_final_sep(tokenizer: Tokenizer) -> None:
    text = "a table for many people please " * 20
    enc = encode_for_extraction(tokenizer, text, ["people"], window=12)
    assert enc.truncated and len(enc) == 12
    assert enc.ids[-1] == tokenizer.token_to_id("[SEP]") and enc.offsets[-1].tolist() == [-1, -1]
    assert tokenizer.decode(enc.ids).startswith("requested : people")
    assert [e.truncated for e in encode_many(tokenizer, [text, "hi"], window=12)] == [True, False]


def test_bio_targets_then_decoding_recover_the_spans(tokenizer: Tokenizer) -> None:
    text = "😀 Zoë Müller, 4 people, on 3. Mai"
    gold = [
        Span("name", 2, 12, "Zoë Müller"),
        Span("people", 14, 22, "4 people"),
        Span("date", 27, 33, "3. Mai"),
    ]
    assert [text[s.start : s.end] for s in gold] == [s.text for s in gold]
    enc = encode_for_extraction(tokenizer, text, ["people"])
    tags = bio_targets(enc.offsets, gold, LABELS)
    assert (tags[enc.offsets[:, 0] < 0] == 0).all()
    n_tags = len(tag_names(LABELS))
    spans = decode_spans(one_hot(tags, n_tags, 0.9), enc.offsets, text, LABELS)
    assert [(s.label, s.start, s.end, s.text) for s in spans] == [
        (s.label, s.start, s.end, s.text) for s in gold
    ]
    assert all(s.confidence == pytest.approx(0.9) for s in spans)


def test_decoding_rules() -> None:
    text = "ab cd ef gh"
    offsets = np.array([[-1, -1], [0, 2], [3, 5], [6, 8], [9, 11], [-1, -1]])
    n_tags = len(tag_names(LABELS))
    b_date, i_date, b_name, i_name = 1, 2, 3, 4
    # An I- without a B- starts a span; B- after B- starts a new one; a label change closes the span.
    tags = np.array([0, i_date, i_date, b_date, i_name, 0])
    probs = one_hot(tags, n_tags, 0.8)
    probs[2] = one_hot(np.array([i_date]), n_tags, 0.6)[0]
    spans = decode_spans(probs, offsets, text, LABELS)
    assert [(s.label, s.text) for s in spans] == [("date", "ab cd"), ("date", "ef"), ("name", "gh")]
    assert spans[0].confidence == pytest.approx(0.6)  # the lowest over the span's pieces
    # Special pieces never join a span, and the text's confidence is the lowest over its pieces.
    assert decode_spans(one_hot(np.array([b_name] * 6), n_tags), offsets[[0, 5]], text, LABELS) == []
    assert text_confidence(probs, offsets) == pytest.approx(0.6)
    assert decode_spans(
        one_hot(np.array([b_name, i_name]), n_tags), np.array([[0, 3], [3, 6]]), "  a  ", LABELS
    )[0] == Span("name", 2, 3, "a", 1.0)


def test_token_head_round_trip(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    head = TokenHead(rng.normal(size=(7, 5)).astype(np.float32), rng.normal(size=7).astype(np.float32))
    head.save(tmp_path)
    loaded = TokenHead.load(tmp_path)
    states = rng.normal(size=(4, 5)).astype(np.float32)
    np.testing.assert_allclose(loaded.probs(states), head.probs(states), rtol=1e-6)
    assert loaded.probs(states).sum(axis=1) == pytest.approx(np.ones(4))


def test_span_scores_and_boundary_errors() -> None:
    gold = [[Span("date", 0, 5, "3 May"), Span("people", 10, 11, "4")], [Span("people", 0, 1, "2")]]
    predicted = [
        [Span("date", 2, 5, "May", 0.7), Span("people", 10, 11, "4", 0.95)],
        [Span("people", 0, 1, "2", 0.99), Span("date", 3, 6, "now", 0.4)],
    ]
    report = evaluate_spans(predicted, gold, [0.7, 0.4], ["date", "people"], target_precision=0.99)
    assert report.micro.precision == pytest.approx(2 / 4) and report.micro.recall == pytest.approx(2 / 3)
    assert report.per_slot["people"].f1 == 1.0 and report.per_slot["date"].f1 == 0.0
    assert report.boundary_errors == [
        {"label": "date", "kind": "too short", "gold": "3 May", "predicted": "May", "count": 1}
    ]
    assert report.calibration.threshold == pytest.approx(0.95) and report.calibration.coverage == 0.5
    assert report.calibration.text_coverage == 0.0 and report.exact_texts == 0.0
    assert precision_at(predicted, gold, 0.9) == (0.5, 1.0)


def test_tagger_info_holds_the_tags() -> None:
    scores = SlotScores(precision=1.0, recall=1.0, f1=1.0, support=3)
    info = ExtractorInfo(
        tagger=TaggerInfo(tags=tag_names(LABELS)),
        uses_context=True,
        micro=scores,
        per_slot={label: scores for label in LABELS},
        trained_format=SpanFormat(format="dstc8"),
    )
    with pytest.raises(ValidationError):
        TaggerInfo(tags=["O"])
    assert info.tagger.file == "tagger.npz" and info.tagger.scheme == "BIO"
