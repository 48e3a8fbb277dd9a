"""Fine-tuning the encoder for span extraction: token classification over BIO tags.

The classifier fine-tune's machinery (:mod:`appliance.factory.finetune`) runs it: the same time
budget and re-planning, progress bar, validation split, early stopping on the best validation
score and atomic checkpoints with resume. Only the model's output (a linear layer over every word
piece's state), the loss (cross-entropy over text pieces) and the validation score (held-out span
micro F1) differ. As for classifiers, the pipeline then exports the tuned encoder and fits the
published token head on its exported states.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from appliance.artifact.spans import Encoded, decode_spans, encode_many, tag_names, text_confidence
from appliance.dataset.spans import SpanData
from appliance.factory.extract import ExtractSpec, targets_for
from appliance.factory.extract_eval import evaluate_spans
from appliance.factory.finetune import (
    EVAL_BATCH,
    VAL_FRACTION,
    Batches,
    Data,
    FinetuneResult,
    Settings,
    Trainer,
    Tuner,
    initial_plan,
    run_key,
    validation_split,
)
from appliance.factory.pipeline import Progress

IGNORE = -100  # cross-entropy's ignore_index: special and context pieces
# Below this many validation texts, span F1 moves by whole spans (64 Restaurant8k examples leave 6
# texts, about 9 spans): early stopping on it picked an undertrained step (test F1 0.45, bench/EXTRACT.md).
MIN_VAL_TEXTS = 20


def token_settings(n_train: int) -> Settings:
    """About 400 steps of 16 texts on a small set, at least 4 epochs on a large one."""
    steps_per_epoch = max(1, math.ceil(n_train / 16))
    epochs = max(4, min(40, math.ceil(400 / steps_per_epoch)))
    return Settings("classifier", epochs=epochs, batch_size=16, lr=1e-4, head_lr=3e-3, patience=5)


class TokenTuner(Tuner):
    """The encoder plus a linear tag layer over each word piece (``weight`` ``[n_tags, D]``)."""

    def token_logits(self, rows: Sequence[Sequence[int]]) -> torch.Tensor:
        states, _ = self.states(rows)
        assert self.weight is not None
        return states @ self.weight.T


class TokenTrainer(Trainer):
    """The classifier trainer with a token loss and a span-F1 validation score."""

    def setup(self, targets: Sequence[np.ndarray], encoded: Sequence[Encoded], data: SpanData) -> None:
        self.targets, self.encoded, self.span_data = targets, encoded, data
        self.labels = data.label_names

    def loss(self, batch: list[int]) -> torch.Tensor:
        assert isinstance(self.model, TokenTuner)
        logits = self.model.token_logits([self.data.ids[i] for i in batch])
        target = torch.full(logits.shape[:2], IGNORE, dtype=torch.long)
        for row, i in enumerate(batch):
            tags = torch.as_tensor(self.targets[i])
            target[row, : len(tags)] = torch.where(tags < 0, IGNORE, tags)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=IGNORE)

    def val_accuracy(self) -> float:
        """Micro span F1 on the validation texts (the score early stopping keeps the best of)."""
        assert isinstance(self.model, TokenTuner)
        model, val = self.model, self.data.val_idx.tolist()
        was_training = model.training
        model.eval()
        predicted, confidences = [], []
        with torch.no_grad():
            for start in range(0, len(val), EVAL_BATCH):
                part = val[start : start + EVAL_BATCH]
                probs = torch.softmax(model.token_logits([self.data.ids[i] for i in part]), dim=-1).numpy()
                for row, i in enumerate(part):
                    enc, text = self.encoded[i], self.span_data.examples[i].text
                    p = probs[row, : len(enc)]
                    predicted.append(decode_spans(p, enc.offsets, text, self.labels))
                    confidences.append(text_confidence(p, enc.offsets))
        model.train(was_training)
        gold = [self.span_data.examples[i].spans for i in val]
        return evaluate_spans(predicted, gold, confidences, self.labels).f1


def finetune_token_encoder(
    spec: ExtractSpec,
    base: Path,
    data: SpanData,
    labels: Sequence[str],
    window: int,
    uses_context: bool,
    progress: Progress,
) -> FinetuneResult:
    """Fine-tune ``base`` for BIO tagging of ``data``; returns the tuned encoder and a summary."""
    from tokenizers import Tokenizer
    from transformers import AutoModel

    started = time.monotonic()
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    torch.manual_seed(spec.seed)
    tokenizer = Tokenizer.from_file(str(base / "tokenizer.json"))
    tokenizer.no_padding()
    tokenizer.no_truncation()
    slots = [e.requested_slots for e in data.examples] if uses_context else None
    encoded = encode_many(tokenizer, data.texts, slots, window)
    targets = targets_for(data, encoded, labels)
    tags = tag_names(labels)
    y = np.zeros(len(data), dtype=np.int64)  # one stratum: the split is a plain random one
    train_idx, val_idx = validation_split(y, VAL_FRACTION, spec.seed)
    if len(val_idx) < MIN_VAL_TEXTS:  # too few to choose a step by: train on all, run the whole plan
        train_idx, val_idx = np.arange(len(data)), np.array([], dtype=np.int64)
    settings = token_settings(len(train_idx))
    model = TokenTuner(
        AutoModel.from_pretrained(base, local_files_only=True),
        len(tags),
        1.0,
        tokenizer.token_to_id("[PAD]") or 0,
    )
    tensors = Data([e.ids for e in encoded], y, train_idx, val_idx)
    batches = Batches(settings, tensors, spec.seed)
    plan = initial_plan(settings, batches.steps_per_epoch, spec.max_steps)
    examples = [
        json.dumps([e.text, [[s.label, s.start, s.end] for s in e.spans], list(e.requested_slots)])
        for e in data.examples
    ]
    key = run_key(base, examples, y, len(tags), window, "token-bio", spec.seed, spec.max_steps, settings)
    ckpt = Path(spec.checkpoint_dir) / f"extract-{key[:16]}.pt" if spec.checkpoint_dir else None
    trainer = TokenTrainer(model, settings, tensors, batches, plan, ckpt, key, progress)
    trainer.setup(targets, encoded, data)
    resumed_from = None
    if ckpt is not None and ckpt.is_file():
        trainer.load()
        resumed_from = trainer.state.step
        progress(f"resuming fine-tuning from {ckpt} at step {resumed_from} of {trainer.plan.total}")
    progress(
        f"fine-tuning (token BIO) on {len(train_idx)} texts, validating on {len(val_idx)}: "
        f"{trainer.plan.total} steps planned, {batches.steps_per_epoch} per epoch, "
        f"budget {spec.max_minutes:g} min"
    )
    if not trainer.state.done:
        trainer.run(deadline=started + spec.max_minutes * 60.0)
    state = trainer.state
    if state.best_encoder is not None:
        model.encoder.load_state_dict(state.best_encoder)
    progress(
        f"fine-tuning stopped at step {state.step} ({state.stop_reason}); best validation span F1 "
        f"{state.best_score:.4f} at step {state.best_step}"
    )
    summary = {
        "strategy": "token-bio",
        "settings": asdict(settings),
        "train_texts": len(train_idx),
        "val_texts": len(val_idx),
        **trainer.plan_summary(),
        "resumed_from_step": resumed_from,
        "step": state.step,
        "best_step": state.best_step,
        # Without validation texts the "score" is the step count: nothing to report.
        "best_val_span_f1": state.best_score if len(val_idx) else None,
        "stop_reason": state.stop_reason,
        "history": state.history,
        "seconds": time.monotonic() - started,
    }
    tuned = model.encoder.cpu().eval()
    for p in tuned.parameters():
        p.requires_grad_(False)
    return FinetuneResult(tuned, summary)
