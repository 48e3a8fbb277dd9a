"""Span-extractor factory benchmark on the shipped Restaurant8k (official test as the held-out file).

Each case trains through ``appliance.factory.extract.train_extractor`` into a private
APPLIANCE_HOME (``--home``), with ``test.json`` as the evaluation file, and records the published
artifact's span F1 (micro and per slot), the int8 gate, the share of spans and texts above the
threshold at precision 0.99 (in-sample: the threshold is calibrated on that same test file),
wall time and the load average before and after (other work may share the box).

    python -m bench.extract --train train_0 --mode head --json-out head0.json
    python -m bench.extract --train train_7 --mode finetune --minutes 6 --json-out ft7.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from appliance.factory.extract import ExtractSpec, train_extractor
from appliance.store import ModelStore

DATA = Path(__file__).resolve().parents[1] / "appliance" / "data" / "restaurant8k"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", default="train_0", help="train_0 (8,198), train_4 (512) or train_7 (64)")
    parser.add_argument("--mode", choices=("head", "finetune"), default="head")
    parser.add_argument("--minutes", type=float, default=45.0, help="fine-tuning budget")
    parser.add_argument("--home", type=Path, help="APPLIANCE_HOME (default: a temporary folder)")
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()
    home = args.home or Path(tempfile.mkdtemp(prefix="bench-extract-"))
    name = f"r8k-{args.train.replace('_', '')}-{args.mode}"
    spec = ExtractSpec(
        data=DATA / f"{args.train}.json",
        eval_data=DATA / "test.json",
        name=name,
        mode=args.mode,
        max_minutes=args.minutes,
    )
    load_before = os.getloadavg()
    started = time.perf_counter()
    result = train_extractor(spec, ModelStore(home), progress=lambda m: print(m, file=sys.stderr, flush=True))
    out = {
        "train": args.train,
        "mode": args.mode,
        "budget_minutes": args.minutes,
        "wall_s": time.perf_counter() - started,
        "load_before": load_before,
        "load_after": os.getloadavg(),
        "cpus": len(os.sched_getaffinity(0)),
        **result.summary(),
    }
    text = json.dumps(out, default=float)
    print(text)
    if args.json_out:
        args.json_out.write_text(text)


if __name__ == "__main__":
    main()
