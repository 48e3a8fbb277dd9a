"""The sentence encoder on ONNX Runtime: tokenize, batch by length, run, L2-normalise.

Padding is the main cost on CPU (sorted-by-length batches run about twice as fast as input-order
ones on Banking77, ENVIRONMENT.md), so :meth:`OnnxEncoder.embed` sorts by token count and cuts
batches by a token budget before it calls the session.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort
from tokenizers import Encoding, Tokenizer

from appliance.artifact.maths import l2_normalize, truncate
from appliance.batching import BatchSettings


@dataclass(frozen=True)
class EncoderConfig:
    max_length: int = 128  # the model window used for serving; longer texts are truncated
    batch: BatchSettings = field(default_factory=BatchSettings)  # embed() cuts its calls by these
    intra_op_threads: int = 0  # per session call; 0: all cores of this process
    # Session calls at once in embed(), each on its own thread; 0: cores // intra_op_threads.
    parallel_batches: int = 0

    @property
    def threads(self) -> int:
        return self.intra_op_threads or cores()

    @property
    def parallel(self) -> int:
        return self.parallel_batches or max(1, cores() // self.threads)


@dataclass(frozen=True)
class Tokenized:
    ids: list[list[int]]
    truncated: list[bool]

    @property
    def lengths(self) -> list[int]:
        return [len(row) for row in self.ids]


def cores() -> int:
    """Cores this process may run on (its CPU set, which a container or Ray may narrow)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def session_options(threads: int) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads or cores()
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # Idle pool threads sleep instead of spinning: a spinning pool takes the cores that the gRPC
    # event loop and the other batch need (bench/PERF.md: +70% served throughput on 2 cores).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


def providers() -> list[str]:
    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


class OnnxEncoder:
    """One ONNX Runtime session plus its tokenizer. Thread-safe: ORT sessions allow concurrent
    ``run`` calls, and the tokenizer is only read."""

    def __init__(self, folder: Path, onnx_file: str, config: EncoderConfig | None = None) -> None:
        self.folder = folder
        self.config = config or EncoderConfig()
        self.tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        self.tokenizer.no_padding()
        self.tokenizer.no_truncation()
        self.session = ort.InferenceSession(
            str(folder / onnx_file), session_options(self.config.intra_op_threads), providers=providers()
        )
        self.dim = int(self.session.get_outputs()[0].shape[-1])
        self._pad_id = self.tokenizer.token_to_id("[PAD]") or 0

    def tokenize(self, texts: Sequence[str]) -> Tokenized:
        encodings: list[Encoding] = self.tokenizer.encode_batch(list(texts))
        rows = [truncate(enc.ids, self.config.max_length) for enc in encodings]
        return Tokenized([ids for ids, _ in rows], [cut for _, cut in rows])

    def padded(self, rows: Sequence[Sequence[int]]) -> dict[str, np.ndarray]:
        """The session inputs for rows padded to the longest."""
        width = max(len(r) for r in rows)
        ids = np.full((len(rows), width), self._pad_id, dtype=np.int64)
        mask = np.zeros((len(rows), width), dtype=np.int64)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = row
            mask[i, : len(row)] = 1
        return {"input_ids": ids, "attention_mask": mask}

    def run_padded(self, rows: Sequence[Sequence[int]]) -> np.ndarray:
        """One session call over rows padded to the longest; returns pooled ``[n, dim]`` float32.

        Only ``pooled`` is fetched: encoders exported for span extractors also have ``states``.
        """
        (pooled,) = self.session.run(["pooled"], self.padded(rows))
        return np.asarray(pooled, dtype=np.float32)

    def run_states(self, rows: Sequence[Sequence[int]]) -> list[np.ndarray]:
        """One session call; each row's last hidden states ``[len(row), dim]`` float32."""
        (states,) = self.session.run(["states"], self.padded(rows))
        return [np.asarray(states[i, : len(row)], dtype=np.float32) for i, row in enumerate(rows)]

    def run_pooled_and_states(self, rows: Sequence[Sequence[int]]) -> tuple[np.ndarray, list[np.ndarray]]:
        """Both outputs of one session call: a batch that holds classifier and extractor rows
        pays for the encoder once."""
        pooled, states = self.session.run(["pooled", "states"], self.padded(rows))
        per_row = [np.asarray(states[i, : len(row)], dtype=np.float32) for i, row in enumerate(rows)]
        return np.asarray(pooled, dtype=np.float32), per_row

    @property
    def has_states(self) -> bool:
        """Whether the graph returns token states (encoders exported before extractors do not)."""
        return any(output.name == "states" for output in self.session.get_outputs())

    def plan_batches(self, lengths: Sequence[int]) -> list[list[int]]:
        """Indices grouped into batches: sorted by length, cut by text count and padded tokens."""
        order = sorted(range(len(lengths)), key=lambda i: lengths[i])
        batches: list[list[int]] = []
        current: list[int] = []
        for i in order:
            width = lengths[i]  # the longest so far, since the order is ascending
            if current and (
                len(current) + 1 > self.config.batch.max_batch_texts
                or (len(current) + 1) * width > self.config.batch.max_batch_tokens
            ):
                batches.append(current)
                current = []
            current.append(i)
        if current:
            batches.append(current)
        return batches

    def pooled(self, tokenized: Tokenized) -> np.ndarray:
        out = np.empty((len(tokenized.ids), self.dim), dtype=np.float32)
        batches = self.plan_batches(tokenized.lengths)

        def run(batch: list[int]) -> None:
            out[batch] = self.run_padded([tokenized.ids[i] for i in batch])

        if self.config.parallel > 1 and len(batches) > 1:
            # Whole batches side by side, one per thread: short texts make GEMMs too small to
            # split well across threads (bench/PERF.md).
            with ThreadPoolExecutor(self.config.parallel, thread_name_prefix="embed") as pool:
                list(pool.map(run, batches))
        else:
            for batch in batches:
                run(batch)
        return out

    def embed(self, texts: Sequence[str]) -> tuple[np.ndarray, list[bool]]:
        """L2-normalised sentence embeddings ``[n, dim]`` and per-text truncation flags."""
        tokenized = self.tokenize(texts)
        return l2_normalize(self.pooled(tokenized)), tokenized.truncated
