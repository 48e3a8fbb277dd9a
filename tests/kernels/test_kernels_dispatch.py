"""The serving entry points: path choice, NumPy in/out, validation, same labels on both paths."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from kernel_checks import assert_topk_matches, head_index_for, make_bank, mixed_counts, token_batch

import kernels
from kernels import fused_classify_topk, pooled_topk, pooled_topk_numpy

ON_CPU = torch.device("cpu")


def test_default_mode_is_auto_and_picks_the_reference_on_cpu():
    assert kernels.kernel_mode() == "auto"
    assert not kernels.uses_triton(ON_CPU)
    assert kernels.uses_triton(torch.device("cuda"))


@pytest.mark.parametrize(("mode", "on_cpu", "on_cuda"), [("triton", True, True), ("reference", False, False)])
def test_the_switch_forces_a_path(monkeypatch, mode, on_cpu, on_cuda):
    monkeypatch.setenv("APPLIANCE_KERNEL", f" {mode.upper()} ")
    assert kernels.uses_triton(ON_CPU) is on_cpu
    assert kernels.uses_triton(torch.device("cuda")) is on_cuda


def test_an_unknown_mode_is_refused(monkeypatch, gen):
    monkeypatch.setenv("APPLIANCE_KERNEL", "cuda")
    bank = make_bank(gen, 384, [3], ON_CPU)
    with pytest.raises(ValueError, match="APPLIANCE_KERNEL must be one of auto, triton, reference"):
        pooled_topk(torch.randn(1, 384), torch.zeros(1, dtype=torch.int64), bank, 1)


def test_both_paths_give_the_same_labels(monkeypatch, gen, device, tolerances):
    """Forced Triton (interpreted on CPU, compiled on a GPU) against forced reference, float32 in."""
    bank = make_bank(gen, 768, mixed_counts(gen), device)
    states, mask = token_batch(gen, 9, 7, 768, torch.float32, device, padded_rows=[4])
    heads = head_index_for(gen, 9, bank.num_heads, device)

    monkeypatch.setenv("APPLIANCE_KERNEL", "reference")
    reference = fused_classify_topk(states, mask, heads, bank, 5, return_probs=True)
    monkeypatch.setenv("APPLIANCE_KERNEL", "triton")
    triton_result = fused_classify_topk(states, mask, heads, bank, 5, return_probs=True)

    assert (
        [t.dtype for t in triton_result]
        == [t.dtype for t in reference]
        == [torch.int64, *[torch.float32] * 2]
    )
    assert torch.equal(triton_result[0], reference[0])
    assert_topk_matches(
        triton_result, [reference[0], *(t.double() for t in reference[1:])], tolerances[torch.float32]
    )


def test_numpy_in_numpy_out_matches_the_tensor_path(gen):
    bank = make_bank(gen, 384, mixed_counts(gen), ON_CPU)
    pooled = torch.randn(6, 384, generator=gen)
    heads = head_index_for(gen, 6, bank.num_heads, ON_CPU)

    tensor_ids, tensor_probs, tensor_full = pooled_topk(pooled, heads, bank, 4, return_probs=True)
    np_ids, np_probs, np_full = pooled_topk(pooled.numpy(), heads.numpy(), bank, 4, return_probs=True)
    alias_ids, alias_probs = pooled_topk_numpy(pooled.numpy(), heads.numpy().astype(np.int32), bank, 4)

    for array in (np_ids, np_probs, np_full, alias_ids, alias_probs):
        assert isinstance(array, np.ndarray)
    assert np_ids.dtype == np.int64 and np_probs.dtype == np.float32
    np.testing.assert_array_equal(np_ids, tensor_ids.numpy())
    np.testing.assert_array_equal(np_probs, tensor_probs.numpy())
    np.testing.assert_array_equal(np_full, tensor_full.numpy())
    np.testing.assert_array_equal(alias_ids, np_ids)


def test_read_only_numpy_arrays_are_accepted(gen):
    bank = make_bank(gen, 384, [4, 5], ON_CPU)
    pooled = torch.randn(2, 384, generator=gen).numpy()
    pooled.flags.writeable = False
    ids, _ = pooled_topk_numpy(pooled, np.array([0, 1]), bank, 2)
    assert ids.shape == (2, 2)


def test_fused_numpy_path_pools_like_the_tensor_path(gen):
    bank = make_bank(gen, 384, mixed_counts(gen), ON_CPU)
    states, mask = token_batch(gen, 5, 7, 384, torch.float32, ON_CPU, padded_rows=[0])
    heads = head_index_for(gen, 5, bank.num_heads, ON_CPU)

    np_ids, np_probs = fused_classify_topk(states.numpy(), mask.numpy(), heads.numpy(), bank, 3)
    ids, probs = fused_classify_topk(states, mask, heads, bank, 3)

    np.testing.assert_array_equal(np_ids, ids.numpy())
    np.testing.assert_array_equal(np_probs, probs.numpy())


def test_probabilities_are_a_distribution_over_the_rows_head(gen):
    bank = make_bank(gen, 384, [2, 151, 40], ON_CPU)
    pooled = torch.randn(3, 384, generator=gen)
    heads = torch.tensor([0, 1, 2])

    ids, probs, full = pooled_topk(pooled, heads, bank, 151, return_probs=True)

    torch.testing.assert_close(full.sum(dim=1), torch.ones(3))
    assert full.shape == (3, 151) and not full[0, 2:].any() and not full[2, 40:].any()
    assert (ids >= 0).sum(dim=1).tolist() == [2, 151, 40]
    assert (probs[:, :-1] >= probs[:, 1:]).all(), "top-k must come best first"
    torch.testing.assert_close(full.gather(1, ids.clamp_min(0)) * (ids >= 0), probs)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"pooled": torch.randn(2, 100)}, "pooled rows have D=100, the head bank D=384"),
        ({"pooled": torch.randn(2, 384, dtype=torch.float64)}, "float32, float16 or bfloat16"),
        ({"pooled": torch.randn(384)}, "pooled must have 2 dimensions"),
        ({"head_index": torch.tensor([0, 2])}, r"head_index must lie in \[0, 2\)"),
        ({"head_index": torch.tensor([-1, 0])}, r"head_index must lie in \[0, 2\)"),
        ({"head_index": torch.tensor([0.0, 1.0])}, "head_index must be int32 or int64"),
        ({"head_index": torch.tensor([0, 1, 1])}, r"head_index must be \[2\]"),
        ({"k": 0}, "k must be a positive integer"),
        ({"k": 2.0}, "k must be a positive integer"),
    ],
)
def test_bad_pooled_input_is_refused(gen, change, message):
    bank = make_bank(gen, 384, [3, 4], ON_CPU)
    args = {"pooled": torch.randn(2, 384, generator=gen), "head_index": torch.tensor([0, 1]), "k": 2}
    args.update(change)
    with pytest.raises(ValueError, match=message):
        pooled_topk(args["pooled"], args["head_index"], bank, args["k"])


def test_bad_token_input_is_refused(gen):
    bank = make_bank(gen, 384, [3], ON_CPU)
    states, mask = token_batch(gen, 2, 5, 384, torch.float32, ON_CPU)
    heads = torch.zeros(2, dtype=torch.int64)
    with pytest.raises(ValueError, match=r"mask must be \[2, 5\], got \(2, 4\)"):
        fused_classify_topk(states, mask[:, :4], heads, bank, 1)
    with pytest.raises(ValueError, match="states must have 3 dimensions"):
        fused_classify_topk(states[0], mask, heads, bank, 1)
    with pytest.raises(TypeError, match=r"states must be a torch\.Tensor or numpy\.ndarray, got list"):
        fused_classify_topk(states.tolist(), mask, heads, bank, 1)
