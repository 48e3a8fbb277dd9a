"""The self-check set a specialist carries: held-out texts with the answers given in the factory.

Every server runs it on its own CPU before it serves a version, because int8 kernels differ by
instruction set (AVX2, AVX-512 VNNI, AMX) and so can a published model's accuracy. Agreement is
measured against the published artifact's own answers in the factory (so the factory's CPU scores
1.0); fp32's answers ride along, to show how far the published precision is from fp32 here. The
file lives in the version folder, so the manifest's hashes and signature cover it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

SELF_CHECK_FILE = "selfcheck.json"
SELF_CHECK_TEXTS = 300
# The share of the set on which this CPU must give the factory's label. int8 on another ISA moved
# about 0.2% of Banking77 test labels (93.02% vs 92.82%); a broken kernel or artifact moves more.
MIN_AGREEMENT = 0.98
_CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "amx_bf16")


class SelfCheckRow(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    text: str
    label: int  # the true label (index into the manifest's labels)
    expected: int  # the published precision's top-1 label in the factory
    expected_prob: float  # and its probability
    fp32: int  # fp32's top-1 label in the factory
    fp32_prob: float  # and its probability


class SelfCheckSet(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    rows: list[SelfCheckRow] = Field(min_length=1)

    def save(self, folder: Path) -> Path:
        path = folder / SELF_CHECK_FILE
        path.write_text(self.model_dump_json(indent=1))
        return path

    @classmethod
    def load(cls, path: Path) -> SelfCheckSet:
        return cls.model_validate_json(path.read_bytes())

    @classmethod
    def from_probs(
        cls, texts: Sequence[str], labels: np.ndarray, published: np.ndarray, fp32: np.ndarray
    ) -> SelfCheckSet:
        """The set from the factory's probabilities ``[n, C]`` of the published precision and fp32."""
        top, top32 = published.argmax(axis=1), fp32.argmax(axis=1)
        return cls(
            rows=[
                SelfCheckRow(
                    text=text,
                    label=int(labels[i]),
                    expected=int(top[i]),
                    expected_prob=float(published[i, top[i]]),
                    fp32=int(top32[i]),
                    fp32_prob=float(fp32[i, top32[i]]),
                )
                for i, text in enumerate(texts)
            ]
        )

    @property
    def texts(self) -> list[str]:
        return [r.text for r in self.rows]


@dataclass(frozen=True)
class SelfCheckResult:
    n: int
    agreement: float  # share of rows whose label here is the factory's label
    fp32_agreement: float  # share of rows whose label here is fp32's label in the factory
    accuracy: float  # share of rows whose label here is the true label
    max_prob_gap: float  # largest |top-1 probability here - the factory's| on agreeing rows
    bound: float
    cpu: str

    @property
    def passed(self) -> bool:
        return self.agreement >= self.bound

    def describe(self) -> str:
        verdict = "meets" if self.passed else "is below"
        return (
            f"self-check label agreement {self.agreement:.4f} on this CPU ({self.cpu}) {verdict} the "
            f"bound {self.bound:.2f} ({self.n} texts; accuracy {self.accuracy:.4f})"
        )

    def to_dict(self) -> dict[str, float | int | str | bool]:
        return {
            "n": self.n,
            "agreement": self.agreement,
            "fp32_agreement": self.fp32_agreement,
            "accuracy": self.accuracy,
            "max_prob_gap": self.max_prob_gap,
            "bound": self.bound,
            "passed": self.passed,
            "cpu": self.cpu,
        }


def score(check: SelfCheckSet, probs: np.ndarray, bound: float, cpu: str | None = None) -> SelfCheckResult:
    """Compare the probabilities this box gives the set's texts with the answers stored in it."""
    here = probs.argmax(axis=1)
    expected = np.array([r.expected for r in check.rows])
    fp32 = np.array([r.fp32 for r in check.rows])
    truth = np.array([r.label for r in check.rows])
    agree = here == expected
    gaps = np.abs(probs[np.arange(len(here)), here] - np.array([r.expected_prob for r in check.rows]))
    return SelfCheckResult(
        n=len(check.rows),
        agreement=float(agree.mean()),
        fp32_agreement=float((here == fp32).mean()),
        accuracy=float((here == truth).mean()),
        max_prob_gap=float(gaps[agree].max()) if agree.any() else 1.0,
        bound=bound,
        cpu=cpu or cpu_isa(),
    )


def cpu_isa() -> str:
    """The instruction sets that decide which int8 kernels ONNX Runtime runs here."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown"
    line = next((x for x in text.splitlines() if x.startswith("flags")), "")
    flags = set(line.partition(":")[2].split())
    return " ".join(f for f in _CPU_FLAGS if f in flags) or "no avx2"
