"""A tiny random Llama and its tokenizer, built locally for tests and demos.

No generative model ships in a package and nothing may be downloaded, so tests build one: a
byte-level BPE tokenizer trained on the shipped Banking77 texts and a randomly initialised
Llama small enough to build in seconds. Its output is noise, but every code path of the
serving stack (tokenizer, chat template, KV cache, structured outputs, stop strings) is real.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import TypedDict

from appliance.config import apply_offline_env

# Bump when the recipe changes, so that an old folder is rebuilt instead of reused.
RECIPE_VERSION = 1
MARKER = "tiny_llm.json"

BOS, EOS, PAD, UNK = "<s>", "</s>", "<pad>", "<unk>"
ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>"]

# One turn per message, closed by EOS, so that the model learns (or would learn) to end its turn.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

VOCAB_SIZE = 4096


class ModelShape(TypedDict):
    """The Llama dimensions, spelled as ``LlamaConfig`` keywords."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    max_position_embeddings: int


# head_dim = hidden / heads = 32: vLLM's CPU attention rejects head_dim 16.
MODEL_SHAPE: ModelShape = {
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 2048,
}


def _banking77_texts() -> Iterator[str]:
    data = resources.files("appliance") / "data" / "banking77"
    # as_file: a real path, whose open() takes the newline="" the csv module needs.
    with resources.as_file(data / "train.csv") as path, path.open(encoding="utf-8", newline="") as f:
        for row in csv.DictReader(f):
            yield row["text"]
    labels = json.loads((data / "categories.json").read_text(encoding="utf-8"))
    for label in labels:
        yield label
        yield label.replace("_", " ")


# A larger sibling (about 8x the parameters of the layers), for mixes of generalists of two sizes.
LARGER_SHAPE: ModelShape = {
    "hidden_size": 256,
    "intermediate_size": 768,
    "num_hidden_layers": 4,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "max_position_embeddings": 2048,
}


def _is_built(out_dir: Path, seed: int, shape: ModelShape) -> bool:
    marker = out_dir / MARKER
    if not marker.is_file():
        return False
    try:
        meta = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    same_shape = all(meta.get(key) == value for key, value in shape.items())
    return bool(meta.get("recipe") == RECIPE_VERSION and meta.get("seed") == seed and same_shape)


def build_tiny_llm(out_dir: Path, seed: int = 0, shape: ModelShape = MODEL_SHAPE) -> Path:
    """Build (or reuse) a tiny random Llama causal LM with its tokenizer in ``out_dir``.

    Returns ``out_dir``, a Hugging Face model folder that vLLM and ``transformers`` load. The
    marker file is written last, so an interrupted build is redone rather than reused.
    """
    out_dir = Path(out_dir)
    if _is_built(out_dir, seed, shape):
        return out_dir
    apply_offline_env()
    # Heavy imports stay here: importing this module must not pull in torch.
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / MARKER).unlink(missing_ok=True)

    bpe = Tokenizer(models.BPE(unk_token=UNK))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=[UNK, BOS, EOS, PAD, *ROLE_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_banking77_texts(), trainer=trainer)
    # Plain prompts start with BOS, as a Llama tokenizer's do.
    bpe.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bpe.token_to_id(BOS))]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        additional_special_tokens=ROLE_TOKENS,
        chat_template=CHAT_TEMPLATE,
        model_max_length=shape["max_position_embeddings"],
    )
    tokenizer.save_pretrained(out_dir)

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        **shape,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(out_dir)

    meta = {"recipe": RECIPE_VERSION, "seed": seed, "vocab_size": len(tokenizer), **shape}
    (out_dir / MARKER).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return out_dir
