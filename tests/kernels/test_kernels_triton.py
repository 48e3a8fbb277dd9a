"""The Triton kernels against the float64 reference (compiled on CUDA, interpreted on CPU)."""

from __future__ import annotations

import pytest
import torch
from kernel_checks import (
    ON_GPU,
    assert_all_written,
    assert_topk_matches,
    head_index_for,
    make_bank,
    mixed_counts,
    poisoned_outputs,
    token_batch,
)

from kernels import (
    HeadBank,
    fused_classify_topk_reference,
    masked_mean_pool,
    pooled_topk_reference,
    triton_topk,
)

F16, BF16, F32 = torch.float16, torch.bfloat16, torch.float32

# Every listed B, T, D and dtype appears, without the full product at the largest sizes: the
# interpreter costs tens of milliseconds per row.
FUSED_CASES = [
    # (B, T, D, dtype, k)
    (1, 1, 384, F32, 1),
    (1, 129, 768, F16, 2),
    (3, 7, 768, F16, 5),
    (3, 129, 384, BF16, 3),
    (127, 1, 768, BF16, 4),
    (127, 7, 384, F32, 5),
    (127, 129, 384, F16, 5),
]

POOLED_CASES = [
    # (B, D, dtype, k)
    (1, 384, F32, 1),
    (3, 768, BF16, 5),
    (127, 384, F16, 3),
    (127, 768, F32, 5),
]


def _case_id(value):
    return str(value).removeprefix("torch.") if isinstance(value, torch.dtype) else None


def _run_fused(states, mask, heads, bank, k):
    out = poisoned_outputs(states.shape[0], k, bank.max_classes, states.device)
    result = triton_topk.fused_pool_topk_triton(states, mask, heads, bank, k, return_probs=True, out=out)
    assert all(r is o for r, o in zip(result, out, strict=True)), "results must land in the given buffers"
    assert_all_written(result)
    return result


def _run_pooled(pooled, heads, bank, k):
    out = poisoned_outputs(pooled.shape[0], k, bank.max_classes, pooled.device)
    result = triton_topk.pooled_topk_triton(pooled, heads, bank, k, return_probs=True, out=out)
    assert_all_written(result)
    return result


def _fused_reference(states, mask, heads, bank, k):
    return fused_classify_topk_reference(
        states.double(), mask, heads, bank, k, return_probs=True, dtype=torch.float64
    )


@pytest.mark.parametrize(("rows", "tokens", "dim", "dtype", "k"), FUSED_CASES, ids=_case_id)
def test_fused_kernel_matches_float64_reference(gen, device, tolerances, rows, tokens, dim, dtype, k):
    bank = make_bank(gen, dim, mixed_counts(gen), device)
    padded = [1] if rows >= 3 else []
    states, mask = token_batch(gen, rows, tokens, dim, dtype, device, padded_rows=padded)
    heads = head_index_for(gen, rows, bank.num_heads, device)

    result = _run_fused(states, mask, heads, bank, k)

    assert_topk_matches(result, _fused_reference(states, mask, heads, bank, k), tolerances[dtype])


@pytest.mark.parametrize(("rows", "dim", "dtype", "k"), POOLED_CASES, ids=_case_id)
def test_pooled_kernel_matches_float64_reference(gen, device, tolerances, rows, dim, dtype, k):
    bank = make_bank(gen, dim, mixed_counts(gen), device)
    pooled = torch.randn(rows, dim, generator=gen).to(dtype).to(device)
    pooled[rows // 2] = 0  # an all-zero row normalises to zeros
    heads = head_index_for(gen, rows, bank.num_heads, device)

    result = _run_pooled(pooled, heads, bank, k)

    reference = pooled_topk_reference(pooled.double(), heads, bank, k, return_probs=True, dtype=torch.float64)
    assert_topk_matches(result, reference, tolerances[dtype])


def test_fully_padded_rows_score_the_softmax_of_the_bias(gen, device, tolerances):
    bank = make_bank(gen, 384, [2, 9, 151], device)
    states, mask = token_batch(gen, 4, 7, 384, F32, device, padded_rows=[0, 2, 3])
    heads = torch.tensor([0, 1, 2, 2], device=device)

    ids, probs, full = _run_fused(states, mask, heads, bank, 3)

    atol, rtol = tolerances[F32]
    for row in (0, 2, 3):
        head = int(heads[row])
        first, count = bank.host_offsets[head], bank.host_counts[head]
        expected = torch.softmax(bank.biases[first : first + count].double().cpu(), dim=0)
        torch.testing.assert_close(full[row, :count].double().cpu(), expected, atol=atol, rtol=rtol)
        assert not full[row, count:].any(), "probabilities past the head's classes must be 0"
        top = torch.sort(expected, descending=True, stable=True)
        n = min(3, count)
        assert ids[row, :n].tolist() == top.indices[:n].tolist()
    # Rows 2 and 3 share a head and are both empty: the same answer regardless of their states.
    assert torch.equal(ids[2], ids[3]) and torch.equal(probs[2], probs[3])


def test_ties_go_to_the_lowest_class_id(gen, device):
    dim = 384
    weight = torch.randn(12, dim, generator=gen)
    bias = torch.zeros(12)
    weight[[3, 7, 9]] = 10.0 * weight[5]  # three equal leaders, after class 5 in the order
    weight[5] = -weight[5]
    weight[[4, 11]] = 0.0  # a tie in the middle of the ranking
    bank = HeadBank.from_heads(
        [(weight, bias), (torch.randn(4, dim, generator=gen), torch.zeros(4))], device=device
    )
    states, mask = token_batch(gen, 3, 5, dim, F32, device, padded_rows=[2])
    states[:2] = weight[5].neg().to(device) / 10.0  # pooled row points at the leaders
    heads = torch.tensor([0, 0, 1], device=device)

    ids, probs, _ = _run_fused(states, mask, heads, bank, 6)

    assert ids[0, :3].tolist() == [3, 7, 9]
    assert ids[0].tolist() == ids[1].tolist()
    assert probs[0, 0] == probs[0, 1] == probs[0, 2]
    # A padded row over zero biases: every class ties, so the ids come out in order.
    assert ids[2].tolist() == [0, 1, 2, 3, -1, -1]
    torch.testing.assert_close(probs[2, :4].cpu(), torch.full((4,), 0.25))
    reference = fused_classify_topk_reference(states, mask, heads, bank, 6)
    assert torch.equal(ids.cpu(), reference[0].cpu())


def test_k_beyond_the_class_count_pads_with_minus_one(gen, device):
    bank = make_bank(gen, 384, [2, 151], device)
    pooled = torch.randn(2, 384, generator=gen).to(device)
    heads = torch.tensor([0, 1], device=device)

    ids, probs, full = _run_pooled(pooled, heads, bank, 4)

    assert sorted(ids[0, :2].tolist()) == [0, 1]
    assert ids[0, 2:].tolist() == [-1, -1] and probs[0, 2:].tolist() == [0.0, 0.0]
    torch.testing.assert_close(probs[0, :2].sum().cpu(), torch.tensor(1.0))
    assert (ids[1] >= 0).all()
    assert not full[0, 2:].any()


def test_unknown_head_on_the_device_yields_no_labels(gen, device):
    """The launcher does not sync to check head ids; the kernel answers -1 rather than read astray."""
    bank = make_bank(gen, 384, [5, 6], device)
    pooled = torch.randn(3, 384, generator=gen).to(device)
    heads = torch.tensor([1, 2, -1], device=device)

    ids, probs, full = _run_pooled(pooled, heads, bank, 3)

    assert (ids[0] >= 0).all()
    assert (ids[1:] == -1).all() and not probs[1:].any() and not full[1:].any()


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.int32, torch.float16], ids=_case_id)
def test_mask_dtypes_agree(gen, device, mask_dtype):
    bank = make_bank(gen, 384, mixed_counts(gen, extra=1), device)
    states, mask = token_batch(gen, 3, 7, 384, F32, device, padded_rows=[2])
    heads = head_index_for(gen, 3, bank.num_heads, device)

    as_int = _run_fused(states, mask, heads, bank, 3)
    as_other = _run_fused(states, mask.to(mask_dtype), heads, bank, 3)

    for a, b in zip(as_int, as_other, strict=True):
        assert torch.equal(a, b)


def test_strided_inputs(gen, device, tolerances):
    """States and pooled rows that are views into larger buffers (as sliced encoder outputs are)."""
    bank = make_bank(gen, 384, mixed_counts(gen, extra=1), device)
    wide, mask = token_batch(gen, 3, 9, 400, F32, device)
    states = wide[:, 1:8, 8:392]
    mask = mask[:, 1:8]
    heads = head_index_for(gen, 3, bank.num_heads, device)
    assert not states.is_contiguous()

    result = _run_fused(states, mask, heads, bank, 3)

    assert_topk_matches(result, _fused_reference(states, mask, heads, bank, 3), tolerances[F32])
    pooled = masked_mean_pool(wide, mask.new_ones(3, 9))[:, 8:392]
    pooled_result = _run_pooled(pooled, heads, bank, 3)
    reference = pooled_topk_reference(pooled.double(), heads, bank, 3, return_probs=True, dtype=torch.float64)
    assert_topk_matches(pooled_result, reference, tolerances[F32])


@pytest.mark.parametrize("bank_dtype", [F16, BF16], ids=_case_id)
def test_half_precision_head_bank(gen, device, tolerances, bank_dtype):
    bank = make_bank(gen, 768, mixed_counts(gen, extra=1), device, dtype=bank_dtype)
    states, mask = token_batch(gen, 3, 7, 768, F32, device)
    heads = head_index_for(gen, 3, bank.num_heads, device)

    result = _run_fused(states, mask, heads, bank, 3)

    assert_topk_matches(result, _fused_reference(states, mask, heads, bank, 3), tolerances[bank_dtype])


def test_empty_batch_launches_nothing(gen, device):
    bank = make_bank(gen, 384, [3], device)
    ids, probs = triton_topk.pooled_topk_triton(
        torch.empty(0, 384, device=device), torch.empty(0, dtype=torch.int64, device=device), bank, 2
    )
    assert ids.shape == (0, 2) and probs.shape == (0, 2)


def test_wrong_output_buffers_are_refused(gen, device):
    bank = make_bank(gen, 384, [3], device)
    pooled = torch.randn(2, 384, generator=gen).to(device)
    heads = torch.zeros(2, dtype=torch.int64, device=device)
    bad = (torch.empty(2, 3, dtype=torch.int64, device=device), torch.empty(2, 2, device=device))
    with pytest.raises(ValueError, match="out tensor must be contiguous"):
        triton_topk.pooled_topk_triton(pooled, heads, bank, 2, out=bad)


def test_compiled_kernels_refuse_cpu_tensors(gen, monkeypatch):
    """Stand-in for a process that imported the kernels compiled: CPU tensors get a clear error."""
    monkeypatch.setattr(triton_topk, "INTERPRETED", False)
    bank = make_bank(gen, 384, [3], torch.device("cpu"))
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        triton_topk.pooled_topk_triton(torch.randn(1, 384), torch.zeros(1, dtype=torch.int64), bank, 1)


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="autotuning benchmarks configurations on a CUDA device")
def test_autotuned_launch_matches_the_fixed_tiles(gen, device, tolerances, monkeypatch):
    bank = make_bank(gen, 768, mixed_counts(gen), device)
    states, mask = token_batch(gen, 64, 33, 768, F16, device, padded_rows=[5])
    heads = head_index_for(gen, 64, bank.num_heads, device)
    pooled = masked_mean_pool(states, mask).to(F16)

    fixed = _run_fused(states, mask, heads, bank, 5), _run_pooled(pooled, heads, bank, 5)
    monkeypatch.setenv("APPLIANCE_KERNEL_AUTOTUNE", "1")
    tuned = _run_fused(states, mask, heads, bank, 5), _run_pooled(pooled, heads, bank, 5)

    reference = _fused_reference(states, mask, heads, bank, 5)
    assert_topk_matches(tuned[0], reference, tolerances[F16])
    pooled_reference = pooled_topk_reference(
        pooled.double(), heads, bank, 5, return_probs=True, dtype=torch.float64
    )
    assert_topk_matches(tuned[1], pooled_reference, tolerances[F16])
    for fixed_result, tuned_result in zip(fixed, tuned, strict=True):
        torch.testing.assert_close(tuned_result[1], fixed_result[1], atol=1e-6, rtol=1e-5)
