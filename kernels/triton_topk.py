"""Fused Triton kernels for the classification tail, one program per row.

Each program streams its row's token states (or pooled vector) and its head's weight rows once,
in D-chunks: pooling, the squared norm and the head's matrix-vector product accumulate chunk by
chunk. L2 normalisation is a scale, so it is applied to the finished logits
(``W·(x/n) = (W·x)/n``) and the row never has to be held whole. Softmax and top-k then run on
the at most ``BLOCK_C`` logits held in registers.

Which heads a batch uses only changes which weight rows a program reads, so a batch mixing
hundreds of heads costs one launch (the gathered multi-adapter idea of Punica's BGMV, applied to
classification heads).

Whether the kernels compile or run under the Triton interpreter is fixed when this module is
imported (``TRITON_INTERPRET``); :data:`INTERPRETED` tells which.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from kernels.bank import HeadBank
from kernels.reference import NORM_EPS

# Register budgets, in elements, for the weight tile [BLOCK_C, BLOCK_K] and the state tile
# [BLOCK_T, BLOCK_D]. ptxas -v for sm_90a, BLOCK_C=256: a 256x64 weight tile used 255 registers and
# spilled; with 256x32 and a 16x256 state tile, 8 warps used 244 registers without spilling (4 warps
# spilled 72 B), which is why the fixed GPU tiles below use 8 warps.
_MAX_WEIGHT_TILE = 8192
_MAX_STATE_TILE = 8192
# The whole logit row lives in one block.
MAX_CLASSES = 8192


# The @triton.jit functions below leave their runtime parameters unannotated: Triton reads parameter
# annotations as kernel types (``tl.constexpr``, pointer dtypes), not as Python type hints.
@triton.jit
def _softmax_topk_store(  # type: ignore[no-untyped-def]  # Triton reads hints as kernel types
    logits,
    n_cls,
    row,
    ids_ptr,
    probs_ptr,
    full_ptr,
    max_classes,
    K: tl.constexpr,
    BLOCK_C: tl.constexpr,
    WRITE_FULL: tl.constexpr,
):
    offs_c = tl.arange(0, BLOCK_C)
    cls_ok = offs_c < n_cls
    logits = tl.where(cls_ok, logits, float("-inf"))
    # A row with no classes (unknown head) has top = -inf; 0 keeps exp() finite, and it writes zeros.
    top = tl.where(n_cls > 0, tl.max(logits, axis=0), 0.0)
    # Max-subtracted, so exp() never overflows; the top class contributes exp(0) = 1 to the sum.
    shifted = tl.exp(logits - top)
    shifted = tl.where(cls_ok, shifted, 0.0)
    total = tl.sum(shifted, axis=0)
    total = tl.where(total > 0.0, total, 1.0)
    if WRITE_FULL:
        tl.store(full_ptr + row * max_classes + offs_c, shifted / total, mask=offs_c < max_classes)
    work = logits
    for i in range(0, K):
        # Ties go to the lowest class id (tie_break_left), as in the reference's stable sort.
        best, pick = tl.max(work, axis=0, return_indices=True, return_indices_tie_break_left=True)
        has = i < n_cls
        tl.store(ids_ptr + row * K + i, tl.where(has, pick, -1).to(tl.int64))
        tl.store(probs_ptr + row * K + i, tl.where(has, tl.exp(best - top) / total, 0.0))
        work = tl.where(offs_c == pick, float("-inf"), work)


@triton.jit
def _head_topk(  # type: ignore[no-untyped-def]  # Triton reads hints as kernel types
    x_ptr,
    stride_xd,
    head_ptr,
    weights_ptr,
    biases_ptr,
    offsets_ptr,
    counts_ptr,
    ids_ptr,
    probs_ptr,
    full_ptr,
    row,
    D,
    num_heads,
    max_classes,
    eps,
    K: tl.constexpr,
    BLOCK_C: tl.constexpr,
    WRITE_FULL: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Score row ``x`` (D values at ``x_ptr``) with its head, normalised, then softmax and top-k."""
    head = tl.load(head_ptr + row).to(tl.int32)
    known = (head >= 0) & (head < num_heads)
    head = tl.where(known, head, 0)
    first = tl.load(offsets_ptr + head).to(tl.int64)
    n_cls = tl.where(known, tl.load(counts_ptr + head), 0)
    offs_c = tl.arange(0, BLOCK_C)
    cls_ok = offs_c < n_cls
    offs_k = tl.arange(0, BLOCK_K)

    sumsq = tl.zeros([BLOCK_K], dtype=tl.float32)
    acc = tl.zeros([BLOCK_C], dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        d = k0 + offs_k
        d_ok = d < D
        x = tl.load(x_ptr + d * stride_xd, mask=d_ok, other=0.0).to(tl.float32)
        sumsq += x * x
        w = tl.load(
            weights_ptr + (first + offs_c)[:, None] * D + d[None, :],
            mask=cls_ok[:, None] & d_ok[None, :],
            other=0.0,
        ).to(tl.float32)
        acc += tl.sum(w * x[None, :], axis=1)

    norm = tl.maximum(tl.sqrt(tl.sum(sumsq, axis=0)), eps)
    bias = tl.load(biases_ptr + first + offs_c, mask=cls_ok, other=0.0).to(tl.float32)
    _softmax_topk_store(
        acc / norm + bias, n_cls, row, ids_ptr, probs_ptr, full_ptr, max_classes, K, BLOCK_C, WRITE_FULL
    )


@triton.jit
def _fused_pool_topk_kernel(  # type: ignore[no-untyped-def]  # Triton reads hints as kernel types
    states_ptr,
    mask_ptr,
    head_ptr,
    weights_ptr,
    biases_ptr,
    offsets_ptr,
    counts_ptr,
    ids_ptr,
    probs_ptr,
    full_ptr,
    scratch_ptr,
    T,
    D,
    num_heads,
    max_classes,
    stride_sb,
    stride_st,
    stride_sd,
    stride_mb,
    stride_mt,
    eps,
    K: tl.constexpr,
    BLOCK_C: tl.constexpr,
    WRITE_FULL: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs_t = tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, BLOCK_D)
    states_row = states_ptr + row * stride_sb
    mask_row = mask_ptr + row * stride_mb
    pooled_row = scratch_ptr + row * D

    # Token weights first: their total turns the sum into a mean; 0 for a fully padded row.
    weight_sum = tl.zeros([BLOCK_T], dtype=tl.float32)
    for t0 in range(0, T, BLOCK_T):
        t = t0 + offs_t
        weight_sum += tl.load(mask_row + t * stride_mt, mask=t < T, other=0).to(tl.float32)
    total = tl.sum(weight_sum, axis=0)
    inv_total = tl.where(total > 0.0, 1.0 / tl.maximum(total, 1e-30), 0.0)

    # Pooling streams the states in wide tiles (the bandwidth-bound part) and parks the pooled row
    # in a small fp32 scratch row that stays in cache; the head product then re-reads it in the
    # narrower chunks its weight tiles need. The two tile shapes tune independently.
    for d0 in range(0, D, BLOCK_D):
        d = d0 + offs_d
        d_ok = d < D
        pooled = tl.zeros([BLOCK_D], dtype=tl.float32)
        for t0 in range(0, T, BLOCK_T):
            t = t0 + offs_t
            m = tl.load(mask_row + t * stride_mt, mask=t < T, other=0).to(tl.float32)
            # Padded tokens are not read at all: the load is predicated on the mask.
            live = (t < T) & (m != 0.0)
            x = tl.load(
                states_row + t[:, None] * stride_st + d[None, :] * stride_sd,
                mask=live[:, None] & d_ok[None, :],
                other=0.0,
            ).to(tl.float32)
            pooled += tl.sum(x * m[:, None], axis=0)
        tl.store(pooled_row + d, pooled * inv_total, mask=d_ok)
    tl.debug_barrier()  # the whole row is written before any thread of the program reads it back

    _head_topk(
        pooled_row,
        1,
        head_ptr,
        weights_ptr,
        biases_ptr,
        offsets_ptr,
        counts_ptr,
        ids_ptr,
        probs_ptr,
        full_ptr,
        row,
        D,
        num_heads,
        max_classes,
        eps,
        K,
        BLOCK_C,
        WRITE_FULL,
        BLOCK_K,
    )


@triton.jit
def _pooled_topk_kernel(  # type: ignore[no-untyped-def]  # Triton reads hints as kernel types
    pooled_ptr,
    head_ptr,
    weights_ptr,
    biases_ptr,
    offsets_ptr,
    counts_ptr,
    ids_ptr,
    probs_ptr,
    full_ptr,
    D,
    num_heads,
    max_classes,
    stride_pb,
    stride_pd,
    eps,
    K: tl.constexpr,
    BLOCK_C: tl.constexpr,
    WRITE_FULL: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    _head_topk(
        pooled_ptr + row * stride_pb,
        stride_pd,
        head_ptr,
        weights_ptr,
        biases_ptr,
        offsets_ptr,
        counts_ptr,
        ids_ptr,
        probs_ptr,
        full_ptr,
        row,
        D,
        num_heads,
        max_classes,
        eps,
        K,
        BLOCK_C,
        WRITE_FULL,
        BLOCK_K,
    )


INTERPRETED: bool = isinstance(_pooled_topk_kernel, InterpretedFunction)


def _prune(configs: list[triton.Config], named_args: dict[str, Any], **kwargs: Any) -> list[triton.Config]:
    """Drop tiles that would spill registers for this head bank; always keep the smallest."""
    block_c = kwargs["BLOCK_C"]

    def size(config: triton.Config) -> tuple[int, int]:
        return block_c * config.kwargs["BLOCK_K"], config.kwargs.get("BLOCK_T", 1) * config.kwargs.get(
            "BLOCK_D", 1
        )

    kept = [c for c in configs if size(c)[0] <= _MAX_WEIGHT_TILE and size(c)[1] <= _MAX_STATE_TILE]
    return kept or [min(configs, key=size)]


# Tuned once per (D, head width, k, dtypes), not per sequence length: a serving batch's T changes
# with every batch, and re-tuning on the request path would stall it. Wide state tiles keep enough
# bytes in flight per program to stream from HBM.
_fused_pool_topk_tuned = triton.autotune(
    configs=[
        triton.Config({"BLOCK_T": bt, "BLOCK_D": bd, "BLOCK_K": bk}, num_warps=w)
        for bt, bd in ((8, 256), (16, 256), (32, 256), (16, 128), (32, 128), (64, 128))
        for bk in (16, 32, 64)
        for w in (4, 8)
    ],
    key=["D", "BLOCK_C", "K", "WRITE_FULL"],
    prune_configs_by={"early_config_prune": _prune},
)(_fused_pool_topk_kernel)

_pooled_topk_tuned = triton.autotune(
    configs=[triton.Config({"BLOCK_K": bk}, num_warps=w) for bk in (16, 32, 64, 128, 256) for w in (2, 4, 8)],
    key=["D", "BLOCK_C", "K", "WRITE_FULL"],
    prune_configs_by={"early_config_prune": _prune},
)(_pooled_topk_kernel)


AUTOTUNE_ENV = "APPLIANCE_KERNEL_AUTOTUNE"


def _autotune() -> bool:
    """Autotuning is on unless ``APPLIANCE_KERNEL_AUTOTUNE=0``: each new key then costs a round of
    compilations, which tests and cold starts may prefer to skip for the fixed tiles below."""
    return os.environ.get(AUTOTUNE_ENV, "1").strip() != "0"


def _fixed_blocks(block_c: int, dim: int, tokens: int = 1) -> dict[str, int]:
    """Tiles without autotuning. The interpreter pays per operation, so it gets the largest tiles;
    a GPU gets wide state tiles and a weight tile that stays in registers."""
    if INTERPRETED:
        return {
            "BLOCK_T": min(triton.next_power_of_2(max(tokens, 1)), 64),
            "BLOCK_D": triton.next_power_of_2(dim),
            "BLOCK_K": min(triton.next_power_of_2(dim), max(16, 2**18 // block_c)),
        }
    block_k = max(16, min(64, _MAX_WEIGHT_TILE // block_c))
    return {"BLOCK_T": 16, "BLOCK_D": 256, "BLOCK_K": block_k, "num_warps": 8}


def _outputs(
    rows: int,
    k: int,
    bank: HeadBank,
    device: torch.device,
    return_probs: bool,
    out: tuple[torch.Tensor, ...] | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Output buffers: the caller's (checked) or fresh ones. ``full`` is a 1-element stand-in if unused."""
    if out is None:
        ids = torch.empty((rows, k), dtype=torch.int64, device=device)
        probs = torch.empty((rows, k), dtype=torch.float32, device=device)
        full = torch.empty(
            (rows, bank.max_classes) if return_probs else (1,), dtype=torch.float32, device=device
        )
        return ids, probs, full
    expected = [((rows, k), torch.int64), ((rows, k), torch.float32)]
    if return_probs:
        expected.append(((rows, bank.max_classes), torch.float32))
    if len(out) != len(expected):
        raise ValueError(f"out must hold {len(expected)} tensors, got {len(out)}")
    for tensor, (shape, dtype) in zip(out, expected, strict=True):
        if tuple(tensor.shape) != shape or tensor.dtype != dtype or not tensor.is_contiguous():
            raise ValueError(
                f"out tensor must be contiguous {dtype} {shape}, got {tensor.dtype} {tuple(tensor.shape)}"
            )
        if tensor.device != device:
            raise ValueError(f"out tensor is on {tensor.device}, the inputs on {device}")
    full = out[2] if return_probs else torch.empty((1,), dtype=torch.float32, device=device)
    return out[0], out[1], full


def _check_launchable(device: torch.device, bank: HeadBank) -> None:
    if device.type == "cpu" and not INTERPRETED:
        raise RuntimeError(
            "the Triton kernels need a CUDA device; on CPU tensors they run only under the Triton "
            "interpreter (set TRITON_INTERPRET=1 before kernels.triton_topk is first imported)"
        )
    if bank.max_classes > MAX_CLASSES:
        raise ValueError(
            f"the fused kernels hold at most {MAX_CLASSES} classes per head, got {bank.max_classes}"
        )


def fused_pool_topk_triton(
    states: torch.Tensor,
    mask: torch.Tensor,
    head_index: torch.Tensor,
    bank: HeadBank,
    k: int,
    *,
    return_probs: bool = False,
    out: tuple[torch.Tensor, ...] | None = None,
) -> tuple[torch.Tensor, ...]:
    """Launch the pooling kernel on validated inputs (see :func:`kernels.fused_classify_topk`)."""
    _check_launchable(states.device, bank)
    rows, tokens, dim = states.shape
    ids, probs, full = _outputs(rows, k, bank, states.device, return_probs, out)
    if rows == 0:
        return (ids, probs, full) if return_probs else (ids, probs)
    if mask.dtype == torch.bool:
        mask = mask.view(torch.uint8)  # same bytes; Triton loads uint8 more simply than int1
    block_c = triton.next_power_of_2(bank.max_classes)
    args = (
        states,
        mask,
        head_index,
        bank.weights,
        bank.biases,
        bank.offsets,
        bank.counts,
        ids,
        probs,
        full,
        torch.empty((rows, dim), dtype=torch.float32, device=states.device),  # pooled rows
        tokens,
        dim,
        bank.num_heads,
        bank.max_classes,
        *states.stride(),
        *mask.stride(),
        NORM_EPS,
    )
    meta = {"K": k, "BLOCK_C": block_c, "WRITE_FULL": return_probs}
    if states.is_cuda and _autotune():
        _fused_pool_topk_tuned[(rows,)](*args, **meta)
    else:
        _fused_pool_topk_kernel[(rows,)](*args, **meta, **_fixed_blocks(block_c, dim, tokens))
    return (ids, probs, full) if return_probs else (ids, probs)


def pooled_topk_triton(
    pooled: torch.Tensor,
    head_index: torch.Tensor,
    bank: HeadBank,
    k: int,
    *,
    return_probs: bool = False,
    out: tuple[torch.Tensor, ...] | None = None,
) -> tuple[torch.Tensor, ...]:
    """Launch the pre-pooled kernel on validated inputs (see :func:`kernels.pooled_topk`)."""
    _check_launchable(pooled.device, bank)
    rows, dim = pooled.shape
    ids, probs, full = _outputs(rows, k, bank, pooled.device, return_probs, out)
    if rows == 0:
        return (ids, probs, full) if return_probs else (ids, probs)
    block_c = triton.next_power_of_2(bank.max_classes)
    args = (
        pooled,
        head_index,
        bank.weights,
        bank.biases,
        bank.offsets,
        bank.counts,
        ids,
        probs,
        full,
        dim,
        bank.num_heads,
        bank.max_classes,
        *pooled.stride(),
        NORM_EPS,
    )
    meta = {"K": k, "BLOCK_C": block_c, "WRITE_FULL": return_probs}
    if pooled.is_cuda and _autotune():
        _pooled_topk_tuned[(rows,)](*args, **meta)
    else:
        blocks = _fixed_blocks(block_c, dim)
        del blocks["BLOCK_T"], blocks["BLOCK_D"]
        _pooled_topk_kernel[(rows,)](*args, **meta, **blocks)
    return (ids, probs, full) if return_probs else (ids, probs)
