"""The serving maths, defined once: pooling, normalisation, head scoring, softmax, truncation.

``probs = softmax(l2_normalize(masked_mean_pool(states, mask)) @ weight.T + bias)``. The exported
ONNX encoder does the pooling (see :mod:`.torch_maths`); the rest runs here on CPU and in the
Triton kernels on GPU, which are tested against these functions.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

NORM_EPS = 1e-12  # as torch.nn.functional.normalize: x / max(||x||, eps)


def masked_mean_pool(states: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Mean of the token states where the 0/1 ``mask`` is set: [B, T, D], [B, T] -> [B, D].

    A fully padded row pools to zeros.
    """
    dtype = np.result_type(states.dtype, np.float32)
    weights = mask.astype(dtype)[..., None]
    total = np.maximum(weights.sum(axis=1), 1.0)
    out: np.ndarray = (states.astype(dtype) * weights).sum(axis=1) / total
    return out


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length; a zero row stays zero."""
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    out: np.ndarray = x / np.maximum(norms, NORM_EPS)
    return out


def softmax(logits: np.ndarray) -> np.ndarray:
    """Softmax over the last axis, shifted by the row maximum so that large logits cannot overflow."""
    shifted = logits - logits.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    out: np.ndarray = exp / exp.sum(axis=-1, keepdims=True)
    return out


def head_logits(normalized: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """A linear head over normalised embeddings: [B, D] @ [C, D].T + [C] -> [B, C]."""
    out: np.ndarray = normalized @ weight.T + bias
    return out


def head_probs(normalized: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
    return softmax(head_logits(normalized, weight, bias))


def truncate(ids: Sequence[int], limit: int) -> tuple[list[int], bool]:
    """Token ids cut to the model window, and whether they were cut.

    A cut keeps the first ``limit - 1`` ids ([CLS] and the start of the text) and the closing
    [SEP], so the encoder always sees a well-formed sequence.
    """
    if limit < 2:
        raise ValueError(f"a window of {limit} tokens cannot hold [CLS] and [SEP]")
    if len(ids) <= limit:
        return list(ids), False
    return [*ids[: limit - 1], ids[-1]], True


# -- out-of-scope scores: higher means more in scope; a score below the threshold is rejected -------

OOS_SCORES = ("max_prob", "max_prob_knn")


def nearest_similarity(normalized: np.ndarray, references: np.ndarray) -> np.ndarray:
    """Cosine similarity of each normalised row ``[B, D]`` to its nearest reference row ``[N, D]``."""
    out: np.ndarray = (normalized.astype(np.float32) @ references.astype(np.float32).T).max(axis=1)
    return out


def oos_score(
    kind: str, probs: np.ndarray, similarity: np.ndarray | None, scale: tuple[float, float, float, float]
) -> np.ndarray:
    """The rejection score of ``kind``: ``max_prob`` is the top probability; ``max_prob_knn`` the mean of
    the top probability and the nearest-training-example similarity, each standardised by ``scale``
    (mean and standard deviation of each on held-out in-scope rows)."""
    top = probs.max(axis=-1)
    if kind == "max_prob":
        return top
    if kind != "max_prob_knn" or similarity is None:
        raise ValueError(f"out-of-scope score {kind!r} needs {OOS_SCORES} and, for knn, similarities")
    p_mean, p_std, s_mean, s_std = scale
    out: np.ndarray = 0.5 * ((top - p_mean) / p_std + (similarity - s_mean) / s_std)
    return out
