"""Several generalists by name, and demonstrations from the specialist's own training set.

The generalists are scripted stand-ins (scripted_generalist.py): these tests check which one a
text goes to, how its time is priced and what it is shown. Two real vLLM generalists served side
by side are tested in tests/generalist/test_generalist_several.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
from scripted_generalist import ScriptedGeneralist

from appliance.engines.generalist import classification_body
from appliance.engines.generalist_api import Demonstration
from appliance.engines.specialist import Specialist
from appliance.errors import InvalidArgument
from appliance.router.cascade import Cascade, ModelRef
from appliance.router.cost import CostModel
from appliance.router.escalations import EscalationStore
from appliance.router.generalists import ModelEscalation
from appliance.router.retrieval import DemonstrationIndex
from appliance.types import Cost, Route, SpecialistAnswer

LABELS = ["card_arrival", "exchange_rate", "refund"]
BOX = CostModel(price_per_hour=3.6, cores=2)
REF = ModelRef(name="bank", version=1, labels=LABELS, threshold=0.9)


def low(n: int) -> list[SpecialistAnswer]:
    return [SpecialistAnswer([("refund", 0.4)], None, False, 0.01, 2.0) for _ in range(n)]


@pytest.fixture
def store(tmp_path: Path) -> EscalationStore:
    return EscalationStore(tmp_path / "esc.db")


def pair() -> dict[str, ScriptedGeneralist]:
    return {
        "small": ScriptedGeneralist(script={"a": "refund"}, engine_seconds=0.1),
        "large": ScriptedGeneralist(script={"a": "exchange_rate"}, engine_seconds=0.1),
    }


def test_the_model_setting_names_the_generalist_and_the_request_overrides_it(store: EscalationStore) -> None:
    gens = pair()
    cascade = Cascade(gens, store, BOX, settings={"bank": ModelEscalation(generalist="large")})

    async def go() -> None:
        by_model = await cascade.decide(REF, low(1), "cascade", texts=["a"])
        by_request = await cascade.decide(REF, low(1), "cascade", texts=["a"], generalist="small")
        assert (by_model[0].label, by_model[0].route) == ("exchange_rate", Route.GENERALIST)
        assert by_request[0].label == "refund"
        with pytest.raises(InvalidArgument, match="'medium', which is not configured; known: small, large"):
            await cascade.decide(REF, low(1), "cascade", texts=["a"], generalist="medium")
        await cascade.close()

    asyncio.run(go())
    assert (gens["large"].calls, gens["small"].calls) == (["a"], ["a"])


def test_without_a_setting_the_default_then_the_first_is_used(store: EscalationStore) -> None:
    gens = pair()
    first = Cascade(gens, store, BOX)
    named = Cascade({**gens, "default": ScriptedGeneralist(script={"a": "card_arrival"})}, store, BOX)

    async def go() -> tuple[str, str]:
        a = await first.decide(REF, low(1), "cascade", texts=["a"])
        b = await named.decide(REF, low(1), "cascade", texts=["a"])
        return a[0].label, b[0].label

    assert asyncio.run(go()) == ("refund", "card_arrival")


def test_a_setting_naming_an_absent_generalist_fails_at_start(store: EscalationStore) -> None:
    with pytest.raises(InvalidArgument, match="model bank escalates to generalist 'huge'"):
        Cascade(pair(), store, BOX, settings={"bank": ModelEscalation(generalist="huge")})
    with pytest.raises(InvalidArgument, match="generalist name"):
        ModelEscalation(generalist="Big Model")
    with pytest.raises(InvalidArgument, match="demonstrations"):
        ModelEscalation(demonstrations=-1)


def test_each_generalist_is_priced_at_its_own_rate(store: EscalationStore) -> None:
    dear = CostModel(price_per_hour=36.0, cores=2)  # ten times the box's rate
    cascade = Cascade(pair(), store, BOX, generalist_costs={"large": dear})

    async def go() -> tuple[Cost, Cost]:
        cheap = await cascade.decide(REF, low(1), "generalist_only", texts=["a"], generalist="small")
        pricey = await cascade.decide(REF, low(1), "generalist_only", texts=["a"], generalist="large")
        return cheap[0].cost, pricey[0].cost

    cheap, pricey = asyncio.run(go())
    specialist = BOX.price(0.01).price  # the specialist's 0.01 core-s, always at the box's rate
    for cost, rate in ((cheap, BOX), (pricey, dear)):
        engine = cost.core_seconds - 0.01  # the generalist's measured core-seconds
        assert engine > 0
        assert cost.price == pytest.approx(specialist + rate.price(engine).price, rel=1e-9)


# ----------------------------------------------------------------------------- demonstrations


def embed(texts: Sequence[str]) -> np.ndarray:
    """A fixed bag-of-letters embedding, enough to make nearest neighbours predictable."""
    out = np.zeros((len(texts), 26), dtype=np.float32)
    for row, text in enumerate(texts):
        for ch in text.lower():
            if "a" <= ch <= "z":
                out[row, ord(ch) - 97] += 1.0
    return out


TRAIN = [
    "card came",
    "card arrived late",
    "rate of exchange",
    "exchange rate today",
    "refund me",
    "money back",
]
TRAIN_LABELS = ["card_arrival", "card_arrival", "exchange_rate", "exchange_rate", "refund", "refund"]


def test_the_index_round_trips_in_float16_and_returns_nearest_first(tmp_path: Path) -> None:
    index = DemonstrationIndex.build(TRAIN, TRAIN_LABELS, embed(TRAIN))
    index.save(tmp_path)
    loaded = DemonstrationIndex.load(tmp_path)
    assert loaded is not None and loaded.vectors.dtype == np.float16
    assert (loaded.texts, loaded.labels) == (TRAIN, TRAIN_LABELS)
    assert np.allclose(np.linalg.norm(loaded.vectors.astype(np.float32), axis=1), 1.0, atol=1e-3)
    got = loaded.nearest(embed(["exchange rate now"]), 2)[0]
    assert [d.label for d in got] == ["exchange_rate", "exchange_rate"]
    assert loaded.nearest(embed(["today: exchange rate"]), 1)[0][0].text == "exchange rate today"
    assert loaded.nearest(embed(["x"]), 0) == [[]]
    assert DemonstrationIndex.load(tmp_path / "absent") is None


class IndexRetriever:
    def __init__(self, index: DemonstrationIndex) -> None:
        self.index = index
        self.asked: list[int] = []

    def nearest(
        self, model: ModelRef | Specialist, texts: Sequence[str], k: int
    ) -> list[list[Demonstration]]:
        self.asked.append(k)
        return self.index.nearest(embed(texts), k)


def test_the_cascade_shows_k_demonstrations_and_none_at_k_0(store: EscalationStore) -> None:
    retriever = IndexRetriever(DemonstrationIndex.build(TRAIN, TRAIN_LABELS, embed(TRAIN)))
    gen = ScriptedGeneralist()
    with_demos = Cascade(
        gen, store, BOX, settings={"bank": ModelEscalation(demonstrations=3)}, retriever=retriever
    )
    without = Cascade(
        gen, store, BOX, settings={"bank": ModelEscalation(demonstrations=0)}, retriever=retriever
    )

    async def go() -> None:
        await with_demos.decide(REF, low(1), "cascade", texts=["refund my money"])
        await without.decide(REF, low(1), "cascade", texts=["card late"])

    asyncio.run(go())
    shown = gen.shown["refund my money"]
    assert len(shown) == 3 and shown[0].label == "refund"
    assert gen.shown["card late"] == [] and retriever.asked == [3]


def test_the_prompt_holds_the_demonstrations_and_k_0_leaves_it_unchanged() -> None:
    demos = [Demonstration("money back", "refund"), Demonstration("card came", "card_arrival")]
    plain = classification_body("where is my card", LABELS, {"refund": "money back"})
    assert classification_body("where is my card", LABELS, {"refund": "money back"}, ()) == plain
    assert "example" not in plain.lower()
    few = classification_body("where is my card", LABELS, {"refund": "money back"}, demos)
    assert "Text: money back\nLabel: refund" in few and "Text: card came\nLabel: card_arrival" in few
    # the examples come before the text to classify, and the instruction is otherwise the same
    assert few.index("Label: card_arrival") < few.index("Text: where is my card")
    start, end = few.index("Labelled examples:"), few.index("Text: where is my card")
    assert few[:start] + few[end:] == plain
