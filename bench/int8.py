"""int8 recipes for the MiniLM-L6 encoder, side by side on Banking77 (full train, official test).

For fp32 and each recipe in ``appliance.factory.int8.RECIPES``: test accuracy of one logistic head
trained on fp32 embeddings of the training file (the head-mode factory), mean and minimum cosine
to fp32, speed (texts/s, sorted batches of 32, one ORT thread) and batch independence (the first
``--alone`` test texts run one by one, then in shuffled batches of 64 of mixed lengths: label
changes and minimum cosine between the two).

    python -m bench.int8 --out /tmp/int8 --json-out int8.json
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from appliance.artifact.maths import l2_normalize
from appliance.batching import BatchSettings
from appliance.engines.encoder import EncoderConfig, OnnxEncoder
from appliance.factory.export import export_encoder_folders
from appliance.factory.head import DEFAULT_C, fit_logistic
from appliance.factory.int8 import RECIPES, TextBatches, default_calibration_texts, quantize_int8
from appliance.factory.pipeline import default_base

DATA = Path(__file__).resolve().parents[1] / "appliance" / "data" / "banking77"
WINDOW = 128


def read(name: str) -> tuple[list[str], list[str]]:
    with (DATA / name).open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    return [r["text"] for r in rows], [r["category"] for r in rows]


def cpu_flags() -> str:
    out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    wanted = ("avx2", "avx512", "vnni", "amx")
    flags = next((line for line in out.splitlines() if line.startswith("Flags")), "").split()
    return " ".join(sorted({f for f in flags if f.startswith(wanted) or "vnni" in f}))


def encoder(folder: Path, batch_texts: int = 64) -> OnnxEncoder:
    config = EncoderConfig(
        max_length=WINDOW,
        batch=BatchSettings(max_batch_texts=batch_texts, max_batch_tokens=1 << 20),
        intra_op_threads=1,
        parallel_batches=1,
    )
    return OnnxEncoder(folder, "model.onnx", config)


def independence(
    enc: OnnxEncoder, texts: list[str], head_labels: Callable[[np.ndarray], np.ndarray]
) -> dict[str, float]:
    ids = enc.tokenize(texts).ids
    alone = l2_normalize(np.concatenate([enc.run_padded([row]) for row in ids]))
    order = list(range(len(ids)))
    random.Random(0).shuffle(order)
    batched = np.empty_like(alone)
    for i in range(0, len(order), 64):
        chunk = order[i : i + 64]
        batched[chunk] = l2_normalize(enc.run_padded([ids[j] for j in chunk]))
    cos = np.sum(alone * batched, axis=1)
    return {
        "labels_changed": int(np.sum(head_labels(alone) != head_labels(batched))),
        "min_cosine": float(cos.min()),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--recipes", default=",".join(RECIPES))
    parser.add_argument("--alone", type=int, default=1000)
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    fp32_folder = args.out / "fp32"
    if not (fp32_folder / "model.onnx").is_file():
        export_encoder_folders(default_base(), args.out)
    train_texts, train_labels = read("train.csv")
    test_texts, test_labels = read("test.csv")
    names = sorted(set(train_labels))
    index = {n: i for i, n in enumerate(names)}
    y_train = np.array([index[x] for x in train_labels])
    y_test = np.array([index[x] for x in test_labels])

    fp32 = encoder(fp32_folder)
    head = fit_logistic(fp32.embed(train_texts)[0], y_train, len(names), DEFAULT_C)

    def labels(x: np.ndarray) -> np.ndarray:
        return head.probs(x).argmax(1)

    results: dict[str, dict[str, float]] = {}
    reference = None
    for name in ["fp32", *args.recipes.split(",")]:
        folder = fp32_folder
        if name != "fp32":
            folder = args.out / name
            folder.mkdir(exist_ok=True)
            for f in fp32_folder.iterdir():
                if f.name != "model.onnx":
                    (folder / f.name).write_bytes(f.read_bytes())
            started = time.perf_counter()
            calibration = TextBatches(folder / "tokenizer.json", default_calibration_texts(), WINDOW)
            quantize_int8(fp32_folder / "model.onnx", folder / "model.onnx", calibration, RECIPES[name])
            quantize_s = time.perf_counter() - started
        enc = encoder(folder, batch_texts=32)
        started = time.perf_counter()
        x = enc.embed(test_texts)[0]
        speed = len(test_texts) / (time.perf_counter() - started)
        reference = x if reference is None else reference
        cos = np.sum(x * reference, axis=1)
        results[name] = {
            "accuracy": float(np.mean(labels(x) == y_test)),
            "mean_cosine_to_fp32": float(cos.mean()),
            "min_cosine_to_fp32": float(cos.min()),
            "texts_per_s_b32_1thread": speed,
            **independence(encoder(folder), test_texts[: args.alone], labels),
            **({"quantize_s": quantize_s} if name != "fp32" else {}),
        }
        print(name, json.dumps(results[name]), flush=True)
    summary = {"cpu_flags": cpu_flags(), "load_average": os.getloadavg(), "results": results}
    print(json.dumps(summary, indent=2))
    if args.json_out:
        args.json_out.write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
