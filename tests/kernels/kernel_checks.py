"""Inputs and comparisons shared by the kernel tests."""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from kernels import HeadBank

# Compiled kernels on a CUDA device unless the interpreter is asked for; else the interpreter on CPU.
ON_GPU = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") != "1"
ID_SENTINEL = -7  # never a valid output: ids are class ids >= 0 or -1


def make_bank(
    gen: torch.Generator,
    dim: int,
    counts: Sequence[int],
    device: torch.device,
    dtype: torch.dtype = torch.float32,
) -> HeadBank:
    """Heads with random weights scaled so that softmaxes are neither flat nor one-hot."""
    heads = [(3.0 * torch.randn(c, dim, generator=gen), torch.randn(c, generator=gen)) for c in counts]
    return HeadBank.from_heads(heads, device=device, dtype=dtype)


def mixed_counts(gen: torch.Generator, extra: int = 4) -> list[int]:
    """Class counts spanning 2..151, the extremes always present."""
    return [2, 151, *torch.randint(3, 151, (extra,), generator=gen).tolist()]


def head_index_for(gen: torch.Generator, rows: int, num_heads: int, device: torch.device) -> torch.Tensor:
    """Every head used once when there are enough rows, the rest random, shuffled."""
    fixed = torch.arange(min(rows, num_heads))
    rest = torch.randint(0, num_heads, (rows - fixed.numel(),), generator=gen)
    heads = torch.cat([fixed, rest])[torch.randperm(rows, generator=gen)]
    return heads.to(device)


def token_batch(
    gen: torch.Generator,
    rows: int,
    tokens: int,
    dim: int,
    dtype: torch.dtype,
    device: torch.device,
    padded_rows: Sequence[int] = (),
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token states and a right-padded 0/1 mask; rows in ``padded_rows`` are fully padded."""
    states = torch.randn(rows, tokens, dim, generator=gen).to(dtype)
    lengths = torch.randint(1, tokens + 1, (rows,), generator=gen)
    lengths[list(padded_rows)] = 0
    mask = (torch.arange(tokens).unsqueeze(0) < lengths.unsqueeze(1)).to(torch.int64)
    return states.to(device), mask.to(device)


def poisoned_outputs(rows: int, k: int, max_classes: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Output buffers pre-filled so that any element the kernel fails to write stands out."""
    return (
        torch.full((rows, k), ID_SENTINEL, dtype=torch.int64, device=device),
        torch.full((rows, k), float("nan"), dtype=torch.float32, device=device),
        torch.full((rows, max_classes), float("nan"), dtype=torch.float32, device=device),
    )


def assert_all_written(outputs: Sequence[torch.Tensor]) -> None:
    ids, *floats = outputs
    assert not (ids == ID_SENTINEL).any(), "some ids were never written"
    for tensor in floats:
        assert not tensor.isnan().any(), "some probabilities were never written"


def assert_topk_matches(
    result: Sequence[torch.Tensor],
    reference: Sequence[torch.Tensor],
    tol: tuple[float, float],
) -> None:
    """Compare (ids, probs, full) with a float64 reference (ids, probs, full).

    Probabilities must agree within ``tol``. Ids must be equal, except where the reference's own
    probabilities for the two ids agree within ``tol``: a near-tie that rounding may order either way.
    """
    atol, rtol = tol
    ids, probs, full = (t.cpu() for t in result)
    ref_ids, ref_probs, ref_full = (t.cpu() for t in reference)
    torch.testing.assert_close(probs.double(), ref_probs, atol=atol, rtol=rtol)
    torch.testing.assert_close(full.double(), ref_full, atol=atol, rtol=rtol)
    assert torch.equal(ids >= 0, ref_ids >= 0), "ids are -1 at different places than in the reference"
    differ = (ids != ref_ids).nonzero().tolist()
    for row, pos in differ:
        mine = ref_full[row, ids[row, pos]]
        theirs = ref_full[row, ref_ids[row, pos]]
        assert abs(mine - theirs) <= atol + rtol * abs(theirs), (
            f"row {row} rank {pos}: id {int(ids[row, pos])} (p={float(mine):.6g}) where the reference "
            f"has {int(ref_ids[row, pos])} (p={float(theirs):.6g})"
        )
