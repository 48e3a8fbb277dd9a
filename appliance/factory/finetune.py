"""Encoder fine-tuning: a better encoder for the logistic head the pipeline trains afterwards.

Three strategies, all on L2-normalised mean-pooled embeddings (what the exported encoder serves):

* ``classifier``: a cosine-softmax layer (``scale * cos(embedding, class weight)``) trained with
  cross-entropy. The class weights start at class centroids, so the first steps do not push
  random-head gradients into the encoder.
* ``contrastive`` (few-shot, SetFit-like): batches of (anchor, positive) pairs with one pair per
  label, trained with a symmetric in-batch softmax over scaled cosine similarities. Every other
  pair in a batch belongs to another label, so no in-batch negative is a false one.

* ``cpft`` (contrastive pre-fine-tuning, after CPFT/ConvFiT): a ``contrastive`` stage on a share
  of the budget (more on few-shot data, where pairs are the main signal) pulls same-label texts
  together, then a ``classifier`` stage starts from its encoder, with centroids taken from it.

``auto`` picks ``contrastive`` at 16 or fewer examples per label on average, else ``cpft``. Every
strategy uses layer-wise learning-rate decay (lower layers move less) and scores an exponential
moving average of the weights beside the raw weights at each evaluation, keeping whichever
validates better; label smoothing is available (``label_smoothing``) but off, since it measured
worse (``bench/FACTORY.md`` has the measured effect of each choice).

Training holds out a stratified validation split, evaluates a fixed number of times per epoch,
keeps the best weights, stops after ``patience`` evaluations without progress in the second half
of the plan, and stops cleanly
when ``spec.max_minutes`` is spent. With ``spec.checkpoint_dir``, every evaluation writes a
checkpoint atomically (weights, optimizer, schedule, step, best weights, RNG state); a later run on
the same data, base, seed and strategy resumes from it.

The plan (and so the learning-rate decay) follows the measured speed: :mod:`.schedule` re-fits it
every few hundred steps and at each epoch end, so the run ends near its budget, shrinking under load
and growing past the recipe's epochs (up to ``MAX_EPOCHS``) when time allows. ``max_steps`` fixes
the plan (never grown), so a short run is deterministic for a given seed while the budget holds it.
The plan is saved with the checkpoint; the summary reports epochs reached and re-fits.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from appliance.artifact.maths import truncate
from appliance.artifact.torch_maths import l2_normalize, masked_mean_pool
from appliance.errors import InvalidArgument
from appliance.factory.schedule import Plan, Planner, lr_factor, warmup_steps

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from appliance.factory.pipeline import TrainSpec

Progress = Callable[[str], None]
STRATEGIES = ("auto", "classifier", "contrastive", "cpft")
# At or below this many examples per label on average the data is few-shot: ``auto`` trains
# contrastive pairs alone, and ``cpft`` gives its contrastive stage a larger share.
FEW_SHOT_PER_LABEL = 16
# Share of the budget (and of a fixed ``max_steps``) for cpft's contrastive stage.
PRETRAIN_SHARE = 0.15
FEW_SHOT_PRETRAIN_SHARE = 0.5
VAL_FRACTION = 0.1
CHECKPOINT_FORMAT = 2  # 2: the moving average of the weights
# The most epochs a plan grows to when the budget allows more than the recipe's (early stopping
# usually ends the run first).
MAX_EPOCHS = 30
# Shuffle, cut into chunks of this many batches, sort each chunk by length: batches are near-uniform
# in length (padding is the main CPU cost) while their order stays random.
BUCKET_BATCHES = 50
CENTROID_EXAMPLES = 8
# Contrastive validation scores against centroids of at most this many training texts per label
# (embedding all of a large training set at every evaluation would cost minutes).
VAL_CENTROID_EXAMPLES = 16
EVAL_BATCH = 64
LOSS_WINDOW = 50


@dataclass(frozen=True)
class Settings:
    strategy: str  # classifier | contrastive
    epochs: int
    batch_size: int  # texts per step; contrastive: pairs per step, so twice as many texts
    lr: float  # encoder
    head_lr: float  # cosine classifier weights
    scale: float = 20.0  # inverse temperature of the cosine softmax
    warmup_fraction: float = 0.1
    weight_decay: float = 0.01
    evals_per_epoch: int = 2
    min_eval_steps: int = 10
    # Evaluations without a better validation accuracy that end the run, counted over the plan's
    # second half only: while the learning rate is still high a plateau says little.
    patience: int = 4
    max_grad_norm: float = 1.0
    label_smoothing: float = 0.0  # classifier objective only
    # Layer i from the top learns at lr * layer_decay**i (the embeddings sit below the last layer).
    layer_decay: float = 1.0
    # Moving average of the weights scored beside them at each evaluation (0: off).
    ema_decay: float = 0.0


# The recipe values an operator may override: every number (the objective is the strategy's).
TUNABLE = tuple(f.name for f in fields(Settings) if f.name != "strategy")


def choose_strategy(strategy: str, y: np.ndarray) -> str:
    if strategy not in STRATEGIES:
        raise InvalidArgument(f"unknown fine-tuning strategy {strategy!r}: use {', '.join(STRATEGIES)}")
    if strategy != "auto":
        return strategy
    # Few-shot, contrastive pairs alone measured best (bench/FACTORY.md): a classifier layer on 8
    # texts a label overfits before the pairs have shaped the space.
    return "contrastive" if few_shot_data(y) else "cpft"


def few_shot_data(y: np.ndarray) -> bool:
    return len(y) / max(1, len(np.unique(y))) <= FEW_SHOT_PER_LABEL


def settings_for(strategy: str, n_train: int) -> Settings:
    """One stage's recipe: ``contrastive`` or ``classifier`` (cpft runs one of each)."""
    common = {"batch_size": 32, "layer_decay": 0.9, "ema_decay": 0.998}
    if strategy == "contrastive":
        return Settings(
            "contrastive", epochs=10, lr=3e-5, head_lr=0.0, evals_per_epoch=1, min_eval_steps=30, **common
        )
    # About 5 epochs on a large set; a small set gets more epochs, up to about 300 steps.
    steps_per_epoch = max(1, math.ceil(n_train / 32))
    epochs = max(5, min(30, math.ceil(300 / steps_per_epoch)))
    # No label smoothing: it tightens each class into a point, which the logistic head re-fitted on
    # the embeddings afterwards does worse on (few-shot: -4.0 points, bench/FACTORY.md).
    return Settings("classifier", epochs=epochs, lr=5e-5, head_lr=2e-3, **common)


@dataclass
class FinetuneResult:
    encoder: nn.Module  # the Hugging Face encoder with the best validation weights, CPU, eval mode
    summary: dict[str, Any] = field(default_factory=dict)


def finetune(
    spec: TrainSpec,
    base: Path,
    texts: list[str],
    y: np.ndarray,
    n_classes: int,
    window: int,
    progress: Progress,
    *,
    strategy: str = "auto",
    max_steps: int | None = None,
) -> nn.Module:
    """Fine-tune the encoder in ``base`` on ``texts`` / ``y``; returns the tuned ``AutoModel``."""
    result = finetune_encoder(
        spec, base, texts, y, n_classes, window, progress, strategy=strategy, max_steps=max_steps
    )
    return result.encoder


def finetune_encoder(
    spec: TrainSpec,
    base: Path,
    texts: list[str],
    y: np.ndarray,
    n_classes: int,
    window: int,
    progress: Progress,
    *,
    strategy: str = "auto",
    max_steps: int | None = None,
    threads: int | None = None,
) -> FinetuneResult:
    """As :func:`finetune`, plus a summary: strategy, stages, steps, validation history, stop reason.

    ``max_steps`` caps the plan (a short, deterministic run; cpft splits it between its stages);
    ``threads`` defaults to the CPUs this process may use. ``spec`` supplies ``max_minutes``,
    ``seed``, ``checkpoint_dir`` and ``finetune_overrides``.
    """
    started = time.monotonic()
    y = np.asarray(y, dtype=np.int64)
    if len(texts) != len(y):
        raise InvalidArgument(f"{len(texts)} texts but {len(y)} labels")
    if len(np.unique(y)) < 2:
        raise InvalidArgument("fine-tuning needs at least two labels")
    if y.min() < 0 or y.max() >= n_classes:
        raise InvalidArgument(f"labels must lie in [0, {n_classes})")
    if spec.max_minutes < 0:
        raise InvalidArgument(f"max_minutes must not be negative, got {spec.max_minutes}")
    check_overrides(spec.finetune_overrides)
    chosen = choose_strategy(strategy, y)
    train_idx, val_idx = validation_split(y, VAL_FRACTION, spec.seed)
    pairs_possible = bool((np.bincount(y[train_idx]) >= 2).any())
    if chosen == "contrastive" and not pairs_possible:
        raise InvalidArgument("contrastive fine-tuning needs a label with at least two training texts")
    torch.set_num_threads(threads or len(os.sched_getaffinity(0)))
    torch.manual_seed(spec.seed)

    from transformers import AutoModel

    encoder = AutoModel.from_pretrained(base, local_files_only=True)
    tokens = Tokens(base, window)
    data = Data(tokens.encode(texts), y, train_idx, val_idx)
    deadline = started + spec.max_minutes * 60.0
    stages = stage_plan(chosen, few_shot_data(y), pairs_possible, max_steps)
    summaries: list[dict[str, Any]] = []
    for name, share, steps in stages:
        stage_settings = apply_overrides(settings_for(name, len(train_idx)), spec.finetune_overrides)
        # A stage ends at its share of the time still left, so an earlier stage that stopped early
        # hands its remainder on.
        stage_deadline = time.monotonic() + share * max(0.0, deadline - time.monotonic())
        model = Tuner(encoder, n_classes if name == "classifier" else 0, stage_settings.scale, tokens.pad_id)
        key = run_key(base, texts, y, n_classes, window, f"{chosen}/{name}", spec.seed, steps, stage_settings)
        summaries.append(run_stage(model, stage_settings, data, spec, key, steps, stage_deadline, progress))
    summary = {
        "strategy": chosen,
        "stages": [s["strategy"] for s in summaries],
        **{k: v for k, v in summaries[-1].items() if k != "strategy"},
        "stage_summaries": summaries,
        "seconds": time.monotonic() - started,
    }
    tuned = encoder.cpu().eval()
    for p in tuned.parameters():
        p.requires_grad_(False)
    return FinetuneResult(tuned, summary)


def stage_plan(
    chosen: str, is_few_shot: bool, pairs_possible: bool, max_steps: int | None
) -> list[tuple[str, float, int | None]]:
    """(stage strategy, share of the remaining budget, its fixed steps) in the order they run."""
    if chosen != "cpft":
        return [(chosen, 1.0, max_steps)]
    if not pairs_possible:  # no label has two texts: no pair to pull together
        return [("classifier", 1.0, max_steps)]
    share = FEW_SHOT_PRETRAIN_SHARE if is_few_shot else PRETRAIN_SHARE
    if max_steps is None:
        return [("contrastive", share, None), ("classifier", 1.0, None)]
    pre = max(1, round(share * max_steps))
    return [("contrastive", share, pre), ("classifier", 1.0, max(1, max_steps - pre))]


def check_overrides(overrides: Mapping[str, float]) -> None:
    unknown = sorted(set(overrides) - set(TUNABLE))
    if unknown:
        raise InvalidArgument(f"unknown fine-tuning settings {unknown}: use {', '.join(TUNABLE)}")


def apply_overrides(settings: Settings, overrides: Mapping[str, float]) -> Settings:
    """``settings`` with the recipe values an operator set (``train --finetune-set KEY=VALUE``)."""
    check_overrides(overrides)
    values = {k: type(getattr(settings, k))(v) for k, v in overrides.items()}
    return replace(settings, **values)


def run_stage(
    model: Tuner,
    settings: Settings,
    data: Data,
    spec: TrainSpec,
    key: str,
    max_steps: int | None,
    deadline: float,
    progress: Progress,
) -> dict[str, Any]:
    """Train one stage into ``model.encoder`` (left holding the stage's best weights)."""
    batches = Batches(settings, data, spec.seed)
    plan = initial_plan(settings, batches.steps_per_epoch, max_steps)
    ckpt = Path(spec.checkpoint_dir) / f"finetune-{key[:16]}.pt" if spec.checkpoint_dir else None
    trainer = Trainer(model, settings, data, batches, plan, ckpt, key, progress)
    resumed_from = None
    if ckpt is not None and ckpt.is_file():
        trainer.load()
        resumed_from = trainer.state.step
        progress(f"resuming fine-tuning from {ckpt} at step {resumed_from} of {trainer.plan.total}")
    elif settings.strategy == "classifier":
        model.init_centroids(data, spec.seed)
    progress(
        f"fine-tuning ({settings.strategy}) on {len(data.train_idx)} texts, validating on "
        f"{len(data.val_idx)}: {trainer.plan.total} steps planned, {batches.steps_per_epoch} per "
        f"epoch, {max(0.0, deadline - time.monotonic()) / 60:.1f} min of budget"
    )
    stage_started = time.monotonic()
    if not trainer.state.done:
        trainer.run(deadline=deadline)
    state = trainer.state
    if state.best_encoder is not None:
        model.encoder.load_state_dict(state.best_encoder)
    progress(
        f"{settings.strategy} stage stopped at step {state.step} ({state.stop_reason}); best "
        f"validation accuracy {state.best_score:.4f} at step {state.best_step} ({state.best_weights})"
    )
    return {
        "strategy": settings.strategy,
        "settings": asdict(settings),
        "train_texts": len(data.train_idx),
        "val_texts": len(data.val_idx),
        **trainer.plan_summary(),
        "resumed_from_step": resumed_from,
        "step": state.step,
        "best_step": state.best_step,
        # Without validation texts the "score" is the step count: nothing to report.
        "best_val_accuracy": state.best_score if len(data.val_idx) else None,
        "best_weights": state.best_weights,
        "stop_reason": state.stop_reason,
        "history": state.history,
        "seconds": time.monotonic() - stage_started,
    }


# -- data --------------------------------------------------------------------------------------------


class Tokens:
    """The base's fast tokenizer with the serving truncation rule (keep the head and the final SEP)."""

    def __init__(self, base: Path, window: int) -> None:
        from tokenizers import Tokenizer

        self.tokenizer = Tokenizer.from_file(str(base / "tokenizer.json"))
        self.tokenizer.no_padding()
        self.tokenizer.no_truncation()
        self.window = window
        self.pad_id = self.tokenizer.token_to_id("[PAD]") or 0

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        rows = [enc.ids for enc in self.tokenizer.encode_batch(list(texts))]
        return [truncate(r, self.window)[0] for r in rows]


@dataclass(frozen=True)
class Data:
    ids: list[list[int]]  # token ids of every text
    y: np.ndarray
    train_idx: np.ndarray
    val_idx: np.ndarray


def validation_split(y: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified (train, validation) indices: about ``fraction`` of each label, at least one text
    of each label left in train, and none taken from a label with a single text."""
    rng = np.random.default_rng([seed, 0x5A1])
    val: list[int] = []
    for label in np.unique(y):
        idx = np.flatnonzero(y == label)
        if len(idx) < 2:
            continue
        take = min(max(1, round(len(idx) * fraction)), len(idx) - 1)
        val += rng.permutation(idx)[:take].tolist()
    val_idx = np.array(sorted(val), dtype=np.int64)
    return np.setdiff1d(np.arange(len(y)), val_idx), val_idx


class Batches:
    """Each epoch's batches, a function of (seed, epoch) only: a resumed run replays the same
    order from the step it stopped at."""

    def __init__(self, settings: Settings, data: Data, seed: int) -> None:
        self.settings, self.data, self.seed = settings, data, seed
        self.steps_per_epoch = len(self.epoch(0))

    def epoch(self, epoch: int) -> list[list[int]]:
        rng = np.random.default_rng([self.seed, epoch])
        return self._pairs(rng) if self.settings.strategy == "contrastive" else self._bucketed(rng)

    def _bucketed(self, rng: np.random.Generator) -> list[list[int]]:
        size, ids = self.settings.batch_size, self.data.ids
        order = rng.permutation(self.data.train_idx).tolist()
        chunk = size * BUCKET_BATCHES
        batches: list[list[int]] = []
        for start in range(0, len(order), chunk):
            part = sorted(order[start : start + chunk], key=lambda i: len(ids[i]))
            batches += [part[i : i + size] for i in range(0, len(part), size)]
        return [batches[i] for i in rng.permutation(len(batches))]

    def _pairs(self, rng: np.random.Generator) -> list[list[int]]:
        """Flattened ``[a1, p1, a2, p2, ...]`` batches holding one pair per label. Each label's
        shuffled texts are paired in turn, so every text appears about once per epoch."""
        y, train_idx = self.data.y, self.data.train_idx
        pairs: dict[int, list[tuple[int, int]]] = {}
        for label in np.unique(y[train_idx]).tolist():
            idx = rng.permutation(train_idx[y[train_idx] == label]).tolist()
            if len(idx) < 2:
                continue
            if len(idx) % 2:
                idx.append(idx[0])
            pairs[label] = [(idx[i], idx[i + 1]) for i in range(0, len(idx), 2)]
        size = self.settings.batch_size
        batches: list[list[int]] = []
        for r in range(max(len(p) for p in pairs.values())):
            labels = [lab for lab in sorted(pairs) if r < len(pairs[lab])]
            labels = [labels[i] for i in rng.permutation(len(labels))]
            for start in range(0, len(labels), size):
                group = labels[start : start + size]
                if len(group) >= 2:  # a lone pair has no negative
                    batches.append([i for lab in group for i in pairs[lab][r]])
        return batches


# -- model -------------------------------------------------------------------------------------------


class Tuner(nn.Module):
    """The encoder, mean-pooled and normalised as it is served, plus an optional cosine classifier."""

    def __init__(self, encoder: PreTrainedModel, n_classes: int, scale: float, pad_id: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.scale = scale
        self.pad_id = pad_id
        self.dim = int(encoder.config.hidden_size)
        self.weight = nn.Parameter(torch.randn(n_classes, self.dim) * 0.02) if n_classes else None

    def states(self, rows: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Last hidden states ``[B, T, D]`` of rows padded to the longest, and their 0/1 mask."""
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
            mask[i, : len(row)] = 1
        return self.encoder(input_ids=ids, attention_mask=mask).last_hidden_state, mask

    def embed(self, rows: Sequence[Sequence[int]]) -> torch.Tensor:
        states, mask = self.states(rows)
        return l2_normalize(masked_mean_pool(states, mask))

    def logits(self, embeddings: torch.Tensor) -> torch.Tensor:
        assert self.weight is not None
        return self.scale * embeddings @ F.normalize(self.weight, dim=-1).T

    @torch.no_grad()
    def embed_all(self, ids: list[list[int]], indices: Sequence[int]) -> torch.Tensor:
        """Embeddings of ``ids[indices]`` in eval mode, batched by length, rows in the given order."""
        was_training = self.training
        self.eval()
        order = sorted(range(len(indices)), key=lambda k: len(ids[indices[k]]))
        out = torch.empty(len(indices), self.dim)
        for start in range(0, len(order), EVAL_BATCH):
            part = order[start : start + EVAL_BATCH]
            out[part] = self.embed([ids[indices[k]] for k in part])
        self.train(was_training)
        return out

    @torch.no_grad()
    def init_centroids(self, data: Data, seed: int) -> None:
        """Class weights := sums of a few base embeddings per class (direction is all that counts)."""
        assert self.weight is not None
        rng = np.random.default_rng([seed, 0xC3])
        y, train_idx = data.y, data.train_idx
        chosen: list[int] = []
        for label in np.unique(y[train_idx]):
            chosen += rng.permutation(train_idx[y[train_idx] == label])[:CENTROID_EXAMPLES].tolist()
        self.weight.zero_()
        self.weight.index_add_(0, torch.as_tensor(y[chosen]), self.embed_all(data.ids, chosen))


# -- training ----------------------------------------------------------------------------------------


@dataclass
class TrainState:
    step: int = 0
    best_score: float = -1.0
    best_step: int = 0
    bad_evals: int = 0
    done: bool = False
    stop_reason: str = ""
    history: list[dict[str, float]] = field(default_factory=list)
    best_weights: str = ""  # "raw" or "ema": which of the two validated best
    best_encoder: dict[str, torch.Tensor] | None = None


class Trainer:
    def __init__(
        self,
        model: Tuner,
        settings: Settings,
        data: Data,
        batches: Batches,
        plan: Plan,
        checkpoint: Path | None,
        key: str,
        progress: Progress,
    ) -> None:
        self.model, self.settings, self.data, self.batches = model, settings, data, batches
        self.checkpoint, self.key, self.progress = checkpoint, key, progress
        self.optimizer = make_optimizer(model, settings)
        # Mutable: the schedule reads it on every step, and the planner re-fits it during the run.
        self.plan = plan
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_factor(s, self.plan))
        self.state = TrainState()
        self.eval_every = max(
            settings.min_eval_steps, math.ceil(batches.steps_per_epoch / settings.evals_per_epoch)
        )
        self.losses: list[float] = []
        self.ema = MovingAverage(model, settings.ema_decay) if settings.ema_decay > 0 else None

    def run(self, deadline: float) -> None:
        from tqdm import tqdm  # type: ignore[import-untyped]  # types-tqdm is not installed

        state, plan, per_epoch = self.state, self.plan, self.batches.steps_per_epoch
        planner = Planner(plan, deadline, state.step, time.monotonic())
        epoch, order = -1, []
        bar = tqdm(
            total=plan.total,
            initial=state.step,
            desc="fine-tune",
            unit="step",
            file=sys.stderr,
            mininterval=1.0,
            dynamic_ncols=True,
        )
        outer = self.progress

        def say(message: str) -> None:  # clear the bar, print, redraw: no message lands mid-bar
            with tqdm.external_write_mode(file=sys.stderr):
                outer(message)

        self.progress = say
        self.model.train()
        try:
            while True:
                if state.step >= plan.total:
                    state.stop_reason = "plan complete"
                    break
                # Every run makes at least one step, so a resumed run with a tiny budget advances.
                if state.step > planner.first_step and time.monotonic() >= deadline:
                    state.stop_reason = "time budget spent"
                    break
                if state.step // per_epoch != epoch:
                    epoch = state.step // per_epoch
                    order = self.batches.epoch(epoch)
                self.train_step(order[state.step % per_epoch])
                now = time.monotonic()
                refit = planner.after_step(state.step, now, epoch_end=state.step % per_epoch == 0)
                if refit:
                    self.progress(refit)
                    bar.total = plan.total
                bar.update(1)
                end = time.localtime(time.time() + planner.projected_end(state.step, now) - now)
                bar.set_postfix(
                    loss=f"{self.recent_loss():.3f}",
                    val=f"{max(state.best_score, 0.0):.3f}",
                    end=time.strftime("%H:%M:%S", end),
                )
                if state.step % self.eval_every == 0 and state.step < plan.total and self.evaluate():
                    break
            if not state.history or state.history[-1]["step"] != state.step:
                self.evaluate()
            state.done = state.stop_reason != "time budget spent"
            self.save()
        finally:
            self.progress = outer
            bar.close()

    def train_step(self, batch: list[int]) -> None:
        loss = self.loss(batch)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.settings.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.state.step += 1
        if self.ema is not None:
            self.ema.update(self.model, self.state.step)
        self.losses.append(float(loss.detach()))

    def loss(self, batch: list[int]) -> torch.Tensor:
        emb = self.model.embed([self.data.ids[i] for i in batch])
        if self.settings.strategy == "classifier":
            target = torch.as_tensor(self.data.y[batch])
            return F.cross_entropy(
                self.model.logits(emb), target, label_smoothing=self.settings.label_smoothing
            )
        anchors, positives = emb[0::2], emb[1::2]
        sims = self.settings.scale * anchors @ positives.T
        target = torch.arange(len(anchors))
        return (F.cross_entropy(sims, target) + F.cross_entropy(sims.T, target)) / 2

    def recent_loss(self) -> float:
        return float(np.mean(self.losses[-LOSS_WINDOW:])) if self.losses else float("nan")

    def plan_summary(self) -> dict[str, Any]:
        """What the manifest reports about the plan: its end, its re-fits and the epochs reached."""
        return {
            "steps_per_epoch": self.batches.steps_per_epoch,
            "planned_steps": self.plan.total,
            "plan_fitted_to_budget": self.plan.fitted,
            "replans": self.plan.replans,
            "epochs_reached": round(self.state.step / self.batches.steps_per_epoch, 2),
        }

    def val_accuracy(self) -> float:
        """Classifier: its own predictions. Contrastive: the nearest training-class centroid."""
        d, model = self.data, self.model
        val_emb = model.embed_all(d.ids, d.val_idx.tolist())
        if self.settings.strategy == "classifier":
            with torch.no_grad():
                pred = model.logits(val_emb).argmax(dim=1).numpy()
        else:
            rng = np.random.default_rng([0xCE])  # the same texts at every evaluation
            labels = np.unique(d.y[d.train_idx])
            chosen = [
                rng.permutation(d.train_idx[d.y[d.train_idx] == lab])[:VAL_CENTROID_EXAMPLES]
                for lab in labels.tolist()
            ]
            centroids = torch.stack([model.embed_all(d.ids, c.tolist()).mean(0) for c in chosen])
            pred = labels[(val_emb @ F.normalize(centroids, dim=-1).T).argmax(dim=1).numpy()]
        return float((pred == d.y[d.val_idx]).mean())

    def evaluate(self) -> bool:
        """Score the raw weights and their moving average, keep the best, checkpoint; True when
        patience has run out.

        Without a validation split (every label has a single text) the latest raw weights count as
        best.
        """
        state = self.state
        if not len(self.data.val_idx):
            scores = {"raw": float(state.step)}
        else:
            scores = {"raw": self.val_accuracy()}
            if self.ema is not None:
                with self.ema.swapped_in(self.model):
                    scores["ema"] = self.val_accuracy()
        loss = self.recent_loss()
        entry = {"step": state.step, "train_loss": loss, "val_accuracy": scores["raw"]}
        if "ema" in scores:
            entry["val_accuracy_ema"] = scores["ema"]
        state.history.append(entry)
        which = max(scores, key=lambda k: scores[k])  # raw on a tie: it is listed first
        if scores[which] > state.best_score:
            state.best_score, state.best_step, state.bad_evals = scores[which], state.step, 0
            state.best_weights = which
            encoder = self.model.encoder.state_dict() if which == "raw" else self.ema.encoder()  # type: ignore[union-attr]
            state.best_encoder = {k: v.detach().clone() for k, v in encoder.items()}
        elif state.step >= self.plan.total / 2:
            state.bad_evals += 1
        shown = ", ".join(f"{k} {v:.4f}" for k, v in scores.items())
        self.progress(
            f"step {state.step}/{self.plan.total}: train loss {loss:.4f}, validation accuracy {shown}"
        )
        stop = state.bad_evals >= self.settings.patience
        if stop:
            state.stop_reason = f"no better validation accuracy in {self.settings.patience} evaluations"
        self.save()
        return stop

    # -- checkpoints

    def save(self) -> None:
        """Write a temporary file beside the checkpoint, fsync, rename: a crash at any point leaves
        the previous checkpoint whole."""
        if self.checkpoint is None:
            return
        self.checkpoint.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "format": CHECKPOINT_FORMAT,
            "key": self.key,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "plan": self.plan.to_dict(),
            "state": {k: v for k, v in asdict(self.state).items() if k != "best_encoder"},
            "best_encoder": self.state.best_encoder,
            "ema": self.ema.weights if self.ema is not None else None,
            "torch_rng": torch.get_rng_state(),
        }
        tmp = self.checkpoint.with_name(f".{self.checkpoint.name}.{os.getpid()}.tmp")
        try:
            with tmp.open("wb") as handle:
                torch.save(payload, handle)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, self.checkpoint)
        finally:
            tmp.unlink(missing_ok=True)

    def load(self) -> None:
        assert self.checkpoint is not None
        payload = read_checkpoint(self.checkpoint)
        if payload.get("format") != CHECKPOINT_FORMAT or payload.get("key") != self.key:
            raise InvalidArgument(
                f"{self.checkpoint}: the checkpoint belongs to another run (data, base or recipe differ)"
            )
        self.model.load_state_dict(payload["model"])
        self.optimizer.load_state_dict(payload["optimizer"])
        self.plan = Plan.from_dict(payload["plan"])
        self.scheduler.load_state_dict(payload["scheduler"])
        torch.set_rng_state(payload["torch_rng"])
        self.state = TrainState(**payload["state"])
        self.state.best_encoder = payload["best_encoder"]
        if self.ema is not None and payload["ema"] is not None:
            self.ema.weights = payload["ema"]


def make_optimizer(model: Tuner, settings: Settings) -> torch.optim.Optimizer:
    """AdamW with layer-wise learning-rate decay; biases and LayerNorm gains (1-D) are not
    weight-decayed (the usual BERT recipe)."""
    n_layers = int(model.encoder.config.num_hidden_layers)
    groups: dict[tuple[int, bool], list[nn.Parameter]] = {}
    for name, p in model.encoder.named_parameters():
        groups.setdefault((layer_depth(name, n_layers), p.ndim >= 2), []).append(p)
    params: list[dict[str, Any]] = [
        {
            "params": ps,
            "lr": settings.lr * settings.layer_decay**depth,
            "weight_decay": settings.weight_decay if decayed else 0.0,
        }
        for (depth, decayed), ps in sorted(groups.items())
    ]
    if model.weight is not None:
        params.append({"params": [model.weight], "lr": settings.head_lr, "weight_decay": 0.0})
    return torch.optim.AdamW(params)


_LAYER = re.compile(r"(?:^|\.)layers?\.(\d+)\.")


def layer_depth(name: str, n_layers: int) -> int:
    """How far below the top of the encoder a parameter sits: 0 for the last transformer layer
    (and the pooler), ``n_layers`` for the embeddings."""
    if "embeddings" in name:
        return n_layers
    match = _LAYER.search(name)
    return n_layers - 1 - int(match.group(1)) if match else 0


class MovingAverage:
    """An exponential moving average of a model's floating-point weights, with the usual warm-up
    (the decay grows from 0.1 towards ``decay``, so early weights do not dominate)."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.weights = {k: v.detach().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        for k, v in model.state_dict().items():
            if v.is_floating_point():
                self.weights[k].mul_(d).add_(v.detach(), alpha=1 - d)

    def encoder(self) -> dict[str, torch.Tensor]:
        return {k.removeprefix("encoder."): v for k, v in self.weights.items() if k.startswith("encoder.")}

    @contextmanager
    def swapped_in(self, model: nn.Module) -> Iterator[None]:
        """``model`` holds the averaged weights inside the block, its own again after it."""
        own = {k: v.detach().clone() for k, v in model.state_dict().items()}
        model.load_state_dict(self.weights)
        try:
            yield
        finally:
            model.load_state_dict(own)


def initial_plan(settings: Settings, steps_per_epoch: int, max_steps: int | None) -> Plan:
    """The recipe's epochs; the planner may grow it to ``MAX_EPOCHS`` unless ``max_steps`` fixes it."""
    total = settings.epochs * steps_per_epoch
    cap = max(settings.epochs, MAX_EPOCHS) * steps_per_epoch
    if max_steps is not None:
        total = cap = max(1, min(total, max_steps))
    return Plan(total=total, warmup=warmup_steps(settings.warmup_fraction, total), cap=cap)


def run_key(
    base: Path,
    texts: Sequence[str],
    y: np.ndarray,
    n_classes: int,
    window: int,
    strategy: str,
    seed: int,
    max_steps: int | None,
    settings: Settings,
) -> str:
    """What a checkpoint must match to be resumed: the base's content, the data and the recipe."""
    from appliance.store import folder_digest, hash_files

    recipe = {
        "format": CHECKPOINT_FORMAT,
        "base": folder_digest(hash_files(base)),
        "n_classes": n_classes,
        "window": window,
        "strategy": strategy,
        "seed": seed,
        "max_steps": max_steps,
        "settings": asdict(settings),
    }
    digest = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode())
    for text, label in zip(texts, y.tolist(), strict=True):
        digest.update(json.dumps([text, label]).encode())
    return digest.hexdigest()


def read_checkpoint(path: Path) -> dict[str, Any]:
    """A checkpoint's contents (tensors and plain data only: ``weights_only`` refuses code)."""
    payload: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=True)
    return payload
