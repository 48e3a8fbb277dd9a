"""A small real specialist for the artifact tests: Banking77 rows, a random 2-layer BERT base (MiniLM's
tokenizer), trained and published through the real factory in head mode."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from appliance.factory.export import TOKENIZER_FILES
from appliance.factory.pipeline import TrainSpec, default_base, train
from appliance.store import Manifest, ModelStore
from tests.artifact.banking import banking_csv


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 2-layer BERT with MiniLM's tokenizer: a real encoder folder, exported in seconds."""
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("artifact-base") / "tiny-bert"
    config = BertConfig(
        vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64
    )
    BertModel(config).save_pretrained(folder)
    for name in TOKENIZER_FILES:
        if (default_base() / name).exists():
            shutil.copy2(default_base() / name, folder / name)
    return folder


@pytest.fixture(scope="session")
def published(tmp_path_factory: pytest.TempPathFactory, tiny_base: Path) -> tuple[ModelStore, Manifest]:
    """``bank4`` trained with text column ``utterance`` and label column ``intent``."""
    work = tmp_path_factory.mktemp("artifact-train")
    header = ("utterance", "intent")
    spec = TrainSpec(
        data=banking_csv("train.csv", work / "train.csv", 20, header),
        eval_data=banking_csv("test.csv", work / "test.csv", 10, header),
        text_column="utterance",
        label_column="intent",
        name="bank4",
        base=tiny_base,
    )
    store = ModelStore(work / "home")
    return store, train(spec, store, progress=lambda _msg: None).manifest
