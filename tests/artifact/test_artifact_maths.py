"""The shared maths: pooling, normalisation, softmax, head scoring and truncation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from appliance.artifact import maths, torch_maths
from appliance.artifact.head import Head


def test_masked_mean_pool_ignores_padding_and_pools_empty_rows_to_zero() -> None:
    states = np.arange(2 * 3 * 2, dtype=np.float32).reshape(2, 3, 2)
    mask = np.array([[1, 1, 0], [0, 0, 0]])
    out = maths.masked_mean_pool(states, mask)
    np.testing.assert_array_equal(out[0], states[0, :2].mean(axis=0))
    np.testing.assert_array_equal(out[1], np.zeros(2))  # all padding: zeros, not NaN


def test_numpy_and_torch_pooling_agree() -> None:
    rng = np.random.default_rng(0)
    states = rng.normal(size=(5, 7, 16)).astype(np.float32)
    lengths = np.array([7, 1, 4, 0, 3])
    mask = (np.arange(7)[None, :] < lengths[:, None]).astype(np.int64)
    expected = maths.masked_mean_pool(states, mask)
    got = torch_maths.masked_mean_pool(torch.from_numpy(states), torch.from_numpy(mask))
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-6, atol=1e-7)
    for row, n in enumerate(lengths):
        if n:
            np.testing.assert_allclose(expected[row], states[row, :n].mean(axis=0), rtol=1e-6)


def test_torch_pooling_computes_in_the_requested_dtype() -> None:
    states = torch.full((1, 2, 3), 1.0, dtype=torch.float16)
    out = torch_maths.masked_mean_pool(states, torch.ones(1, 2, dtype=torch.int64), torch.float64)
    assert out.dtype == torch.float64


def test_l2_normalize_makes_unit_rows_and_keeps_zero_rows() -> None:
    x = np.array([[3.0, 4.0], [0.0, 0.0], [1e-20, 0.0]], dtype=np.float32)
    out = maths.l2_normalize(x)
    np.testing.assert_allclose(out[0], [0.6, 0.8], rtol=1e-6)
    np.testing.assert_array_equal(out[1], [0.0, 0.0])
    # below eps the row is divided by eps, not blown up to unit length
    np.testing.assert_allclose(out[2], [1e-20 / maths.NORM_EPS, 0.0], rtol=1e-6)
    torch_out = torch_maths.l2_normalize(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(torch_out, out, rtol=1e-6)
    np.testing.assert_allclose(
        torch_out, torch.nn.functional.normalize(torch.from_numpy(x), dim=-1, eps=maths.NORM_EPS).numpy()
    )


def test_softmax_is_stable_and_sums_to_one() -> None:
    logits = np.array([[1000.0, 1001.0, 999.0], [-1e4, 0.0, -1e4]], dtype=np.float32)
    probs = maths.softmax(logits)
    assert np.isfinite(probs).all()
    np.testing.assert_allclose(probs.sum(axis=1), [1.0, 1.0], rtol=1e-6)
    np.testing.assert_allclose(probs[0], torch.softmax(torch.from_numpy(logits[0]), 0).numpy(), rtol=1e-6)
    assert probs[1, 1] == pytest.approx(1.0)


def test_head_scores_normalised_embeddings_linearly() -> None:
    rng = np.random.default_rng(1)
    weight = rng.normal(size=(4, 8)).astype(np.float32)
    bias = rng.normal(size=4).astype(np.float32)
    x = maths.l2_normalize(rng.normal(size=(3, 8)).astype(np.float32))
    logits = maths.head_logits(x, weight, bias)
    np.testing.assert_allclose(logits, np.einsum("bd,cd->bc", x, weight) + bias, rtol=1e-5)
    np.testing.assert_allclose(Head(weight, bias).probs(x), maths.softmax(logits), rtol=1e-6)


def test_head_file_round_trips(tmp_path: Path) -> None:
    head = Head(np.eye(3, 4, dtype=np.float32), np.arange(3, dtype=np.float32))
    head.save(tmp_path)
    loaded = Head.load(tmp_path)
    np.testing.assert_array_equal(loaded.weight, head.weight)
    np.testing.assert_array_equal(loaded.bias, head.bias)


def test_truncation_keeps_the_start_and_the_closing_token() -> None:
    assert maths.truncate([101, 5, 6, 102], 4) == ([101, 5, 6, 102], False)
    assert maths.truncate([101, 5, 6, 7, 8, 102], 4) == ([101, 5, 6, 102], True)
    assert maths.truncate([101, 102], 2) == ([101, 102], False)
    with pytest.raises(ValueError, match="cannot hold"):
        maths.truncate([101, 5, 102], 1)
