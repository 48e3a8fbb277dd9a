"""One specialist, one answer: the served probabilities, the factory's evaluation path, the kernels'
reference and the shared maths agree on the same texts."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest
import torch

from appliance.artifact import maths, torch_maths
from appliance.engines.encoder import EncoderConfig, OnnxEncoder
from appliance.engines.specialist import load_specialist
from appliance.factory.evaluate import evaluate
from appliance.serve.runtime import RuntimeSettings, ServingRuntime
from appliance.store import Manifest, ModelStore
from kernels import HeadBank, pooled_topk_reference
from tests.artifact.banking import sample_texts

pytestmark = pytest.mark.slow
TOLERANCE = 1e-6


def served_probs(store: ModelStore, model: str, texts: list[str]) -> tuple[np.ndarray, list[bool]]:
    async def run() -> tuple[np.ndarray, list[bool]]:
        runtime = ServingRuntime(RuntimeSettings(models=(model,), intra_op_threads=1), store=store)
        await runtime.start()
        try:
            outcome = await runtime.classify(model, texts, top_k=len(texts), want_probs=True)
        finally:
            await runtime.close()
        assert all(d.probs is not None for d in outcome.decisions)
        return np.stack([d.probs for d in outcome.decisions]), [d.truncated for d in outcome.decisions]

    return asyncio.run(run())


def test_serving_factory_and_kernel_reference_agree(published: tuple[ModelStore, Manifest]) -> None:
    store, manifest = published
    texts = sample_texts()
    specialist = load_specialist(manifest.name, store)
    labels = specialist.labels

    factory, factory_truncated = specialist.probs(texts)
    served, served_truncated = served_probs(store, manifest.name, texts)

    tokenized = specialist.encoder.tokenize(texts)
    pooled = specialist.encoder.pooled(tokenized)
    head = specialist.head
    shared = maths.head_probs(maths.l2_normalize(pooled), head.weight, head.bias)
    bank = HeadBank.from_heads([(head.weight, head.bias)], device="cpu")
    rows = torch.zeros(len(texts), dtype=torch.int64)
    _, _, reference = pooled_topk_reference(
        torch.from_numpy(pooled), rows, bank, len(labels), return_probs=True
    )

    assert served.shape == factory.shape == shared.shape == (len(texts), len(labels))
    np.testing.assert_allclose(served, factory, rtol=0, atol=TOLERANCE)
    np.testing.assert_allclose(shared, factory, rtol=0, atol=TOLERANCE)
    np.testing.assert_allclose(reference.numpy()[:, : len(labels)], shared, rtol=0, atol=TOLERANCE)
    assert served_truncated == factory_truncated == tokenized.truncated
    assert served_truncated[-1] and not any(served_truncated[:-1])  # the long text, and only it

    # the factory's evaluation of the two distributions is the same report
    y = served.argmax(axis=1)
    assert evaluate(served, y, labels).summary() == pytest.approx(evaluate(factory, y, labels).summary())


def test_the_exported_encoder_pools_with_the_shared_maths(
    published: tuple[ModelStore, Manifest], tiny_base: Path
) -> None:
    """The fp32 ONNX graph against the base model run eagerly and pooled by torch_maths."""
    from transformers import AutoModel

    store, manifest = published
    spec = manifest.spec
    config = EncoderConfig(max_length=spec.encoder.window)
    encoder = OnnxEncoder(store.encoder_folder(spec.encoders["fp32"]), "model.onnx", config)
    base = AutoModel.from_pretrained(tiny_base, local_files_only=True).eval()

    tokenized = encoder.tokenize(sample_texts(1))
    width = max(tokenized.lengths)
    ids = torch.zeros(len(tokenized.ids), width, dtype=torch.int64)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(tokenized.ids):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    with torch.no_grad():
        states = base(input_ids=ids, attention_mask=mask).last_hidden_state
    eager = torch_maths.masked_mean_pool(states, mask).numpy()
    np.testing.assert_allclose(encoder.run_padded(tokenized.ids), eager, rtol=1e-4, atol=1e-5)
