"""Packing specialist heads into one bank."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kernels import HeadBank


def test_heads_are_packed_in_order(gen):
    heads = [(torch.randn(c, 8, generator=gen), torch.randn(c, generator=gen)) for c in (3, 1, 5)]
    heads[1] = (heads[1][0].numpy(), heads[1][1].numpy())  # NumPy heads pack the same way

    bank = HeadBank.from_heads(heads, dtype=torch.float16)

    assert bank.num_heads == 3 and bank.dim == 8 and bank.max_classes == 5
    assert bank.offsets.tolist() == [0, 3, 4] and bank.counts.tolist() == [3, 1, 5]
    assert (bank.host_offsets, bank.host_counts) == ((0, 3, 4), (3, 1, 5))
    assert bank.weights.dtype == torch.float16 and bank.biases.dtype == torch.float32
    assert bank.offsets.dtype == torch.int64 and bank.counts.dtype == torch.int32
    for (weight, bias), first in zip(heads, (0, 3, 4), strict=True):
        rows = slice(first, first + len(bias))
        torch.testing.assert_close(bank.weights[rows], torch.as_tensor(weight).half())
        torch.testing.assert_close(bank.biases[rows], torch.as_tensor(bias))


def test_to_keeps_the_layout(gen):
    bank = HeadBank.from_heads([(torch.randn(2, 4, generator=gen), torch.zeros(2))])
    moved = bank.to("cpu")
    assert moved.host_counts == bank.host_counts and torch.equal(moved.weights, bank.weights)


@pytest.mark.parametrize(
    ("heads", "message"),
    [
        ([], "at least one head"),
        ([(np.zeros((0, 4)), np.zeros(0))], r"weight must be \[classes >= 1, D\]"),
        ([(np.zeros(4), np.zeros(1))], r"weight must be \[classes >= 1, D\]"),
        ([(np.zeros((2, 4)), np.zeros(2)), (np.zeros((2, 5)), np.zeros(2))], "head 1: weight has D=5"),
        ([(np.zeros((2, 4)), np.zeros(3))], r"head 0: bias must be \[2\]"),
        ([(np.full((2, 4), np.nan), np.zeros(2))], "NaN or infinity"),
        ([(np.zeros((2, 4)), np.array([0.0, np.inf]))], "NaN or infinity"),
    ],
)
def test_bad_heads_are_refused(heads, message):
    with pytest.raises(ValueError, match=message):
        HeadBank.from_heads(heads)


def test_unsupported_bank_dtype_is_refused():
    with pytest.raises(ValueError, match="float32, float16 or bfloat16"):
        HeadBank.from_heads([(np.zeros((2, 4)), np.zeros(2))], dtype=torch.float64)
