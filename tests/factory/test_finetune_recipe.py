"""The fine-tune recipe's pieces, without training: stages, layer-wise decay, the moving average
and the recipe overrides (``train --finetune-set``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from appliance.errors import InvalidArgument
from appliance.factory import finetune as ft
from appliance.factory.commands import parse_overrides


def test_cpft_gives_few_shot_data_a_larger_contrastive_share() -> None:
    assert ft.stage_plan("cpft", False, True, None) == [
        ("contrastive", ft.PRETRAIN_SHARE, None),
        ("classifier", 1.0, None),
    ]
    assert ft.stage_plan("cpft", True, True, 10) == [("contrastive", 0.5, 5), ("classifier", 1.0, 5)]
    assert ft.FEW_SHOT_PRETRAIN_SHARE > ft.PRETRAIN_SHARE
    # No label with two texts: no pair to pull together, the classifier alone.
    assert ft.stage_plan("cpft", True, False, 10) == [("classifier", 1.0, 10)]
    assert ft.stage_plan("classifier", False, True, 4) == [("classifier", 1.0, 4)]
    few = np.repeat(np.arange(4), 10)  # 10 texts a label: few-shot, contrastive pairs alone
    assert ft.choose_strategy("auto", few) == "contrastive"
    assert ft.choose_strategy("auto", np.repeat(np.arange(4), 40)) == "cpft"


def test_layer_depth_counts_from_the_top() -> None:
    assert ft.layer_depth("encoder.layer.5.attention.self.query.weight", 6) == 0
    assert ft.layer_depth("encoder.layer.0.output.dense.bias", 6) == 5
    assert ft.layer_depth("embeddings.word_embeddings.weight", 6) == 6
    assert ft.layer_depth("pooler.dense.weight", 6) == 0


def test_optimizer_groups_decay_by_layer() -> None:
    from transformers import BertConfig, BertModel

    config = BertConfig(
        vocab_size=50, hidden_size=8, num_hidden_layers=3, num_attention_heads=2, intermediate_size=16
    )
    model = ft.Tuner(BertModel(config), n_classes=4, scale=20.0, pad_id=0)
    settings = ft.Settings("classifier", epochs=1, batch_size=2, lr=1e-3, head_lr=1e-2, layer_decay=0.5)
    optimizer = ft.make_optimizer(model, settings)
    lr_of = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    named = dict(model.encoder.named_parameters())
    assert lr_of[id(named["encoder.layer.2.output.dense.weight"])] == pytest.approx(1e-3)
    assert lr_of[id(named["encoder.layer.0.output.dense.weight"])] == pytest.approx(1e-3 * 0.25)
    assert lr_of[id(named["embeddings.word_embeddings.weight"])] == pytest.approx(1e-3 * 0.125)
    assert lr_of[id(model.weight)] == pytest.approx(1e-2)
    decay_of = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    assert decay_of[id(named["encoder.layer.0.output.dense.bias"])] == 0.0
    assert decay_of[id(named["encoder.layer.0.output.dense.weight"])] == settings.weight_decay
    # Every encoder parameter is in exactly one group.
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(named) + 1


def test_moving_average_follows_and_swaps_back() -> None:
    model = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(0.0)
    ema = ft.MovingAverage(model, decay=0.5)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema.update(model, step=100)  # past the warm-up: the decay is 0.5
    assert torch.allclose(ema.weights["weight"], torch.full((1, 2), 0.5))
    with ema.swapped_in(model):
        assert torch.allclose(model.weight, torch.full((1, 2), 0.5))
    assert torch.allclose(model.weight, torch.ones(1, 2))
    # Early on the warm-up keeps the average close to the latest weights.
    fresh = ft.MovingAverage(model, decay=0.999)
    with torch.no_grad():
        model.weight.fill_(3.0)
    fresh.update(model, step=0)
    assert torch.allclose(fresh.weights["weight"], torch.full((1, 2), 1.0 + 2.0 * 0.9))


def test_overrides_apply_and_refuse_unknown_keys() -> None:
    settings = ft.settings_for("classifier", 1000)
    assert settings.label_smoothing == 0 and settings.layer_decay < 1 and settings.ema_decay > 0
    plain = ft.apply_overrides(
        settings, {"label_smoothing": 0.1, "layer_decay": 1, "ema_decay": 0, "epochs": 7}
    )
    assert (plain.label_smoothing, plain.layer_decay, plain.ema_decay) == (0.1, 1.0, 0.0)
    assert plain.epochs == 7 and isinstance(plain.epochs, int)
    with pytest.raises(InvalidArgument, match="unknown fine-tuning settings"):
        ft.apply_overrides(settings, {"strategy": 1.0})
    assert parse_overrides(["label_smoothing=0", "lr=3e-5"]) == {"label_smoothing": 0.0, "lr": 3e-5}
    for bad in ("label_smoothing", "=1", "lr=fast"):
        with pytest.raises(InvalidArgument, match="expected KEY=NUMBER"):
            parse_overrides([bad])
