"""The tiny test model: a loadable Hugging Face folder, reused when already built."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from transformers import AutoConfig, AutoTokenizer

from appliance.engines.tiny_llm import MARKER, build_tiny_llm

pytestmark = pytest.mark.slow


def test_tiny_llm_loads_with_a_chat_template_and_vllm_friendly_shape(tiny_llm: Path) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_llm)
    config = AutoConfig.from_pretrained(tiny_llm)
    assert config.hidden_size // config.num_attention_heads >= 32  # vLLM CPU needs head_dim >= 32
    assert config.vocab_size == len(tok)
    assert tok.bos_token and tok.eos_token and tok.pad_token and tok.unk_token
    ids = tok("my card has not arrived")["input_ids"]
    assert ids[0] == tok.bos_token_id
    assert tok.decode(ids, skip_special_tokens=True) == "my card has not arrived"
    rendered = tok.apply_chat_template(
        [{"role": "user", "content": "where is my card?"}], tokenize=False, add_generation_prompt=True
    )
    assert "where is my card?" in rendered and rendered.endswith("<|assistant|>\n")


def test_build_reuses_a_finished_folder_and_redoes_an_unfinished_one(tiny_llm: Path, tmp_path: Path) -> None:
    assert build_tiny_llm(tiny_llm, seed=0) == tiny_llm  # finished: reused as it is

    copy = Path(shutil.copytree(tiny_llm, tmp_path / "copy"))
    weights = copy / "model.safetensors"
    before = weights.stat().st_mtime_ns
    assert build_tiny_llm(copy, seed=0) == copy
    assert weights.stat().st_mtime_ns == before

    assert json.loads((copy / MARKER).read_text())["seed"] == 0
    (copy / MARKER).unlink()  # as if a build had been interrupted
    build_tiny_llm(copy, seed=0)
    assert (copy / MARKER).is_file()
    assert weights.stat().st_mtime_ns != before
    # The same seed gives the same model, byte for byte.
    assert weights.read_bytes() == (tiny_llm / "model.safetensors").read_bytes()
