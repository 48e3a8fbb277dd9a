"""Kernel tests: compiled on a CUDA device when there is one, else under the Triton interpreter.

Triton picks the interpreter when a function is decorated, so ``TRITON_INTERPRET=1`` must be set
before ``triton`` (whose ``tl.sum``/``tl.max`` are themselves jitted) and ``kernels.triton_topk`` are
imported. The whole suite shares one process, so:

- the variable is set here, at collection, only around importing the kernels (re-importing them
  if something imported them compiled first), and again for the duration of each kernel test;
  tests collected later import Triton as they would have anyway;
- if another test module imported Triton before this file ran (``import torch._dynamo`` does), its
  library functions are compiled-mode objects that refuse calls; for the duration of each kernel
  test they are then run through the interpreter too.
"""

from __future__ import annotations

import importlib
import os
import sys
import zlib
from collections.abc import Iterator

import pytest
import torch
from kernel_checks import ON_GPU

DEVICE = torch.device("cuda" if ON_GPU else "cpu")

# (atol, rtol) for probabilities against a float64 reference fed the same rounded inputs, keyed by
# the dtype of the states/pooled rows. The kernels accumulate in fp32 whatever they load, so these
# bound fp32 summation-order and exp/sqrt differences; fp16/bf16 leave room for a compiled GPU
# build. Measured under the interpreter: max |error| about 1.4e-7.
TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2e-5, 1e-4),
    torch.bfloat16: (2e-5, 1e-4),
}


def _triton_imported_compiled() -> bool:
    standard = sys.modules.get("triton.language.standard")
    if standard is None:
        return False
    from triton.runtime.interpreter import InterpretedFunction

    return not isinstance(standard.sum, InterpretedFunction)


def _import_kernels_interpreted() -> None:
    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        module = sys.modules.get("kernels.triton_topk")
        if module is None:
            importlib.import_module("kernels.triton_topk")
        elif not module.INTERPRETED:
            importlib.reload(module)
    finally:
        if previous is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = previous


TRITON_PREIMPORTED = not ON_GPU and _triton_imported_compiled()
if not ON_GPU:
    _import_kernels_interpreted()


def _interpret_compiled_library(monkeypatch: pytest.MonkeyPatch) -> None:
    """Route calls to compiled-mode jitted functions (Triton's own tl.sum, tl.max) through the interpreter."""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    interpreted: dict[object, InterpretedFunction] = {}

    def call(self: JITFunction, *args: object, **kwargs: object) -> object:
        if self.fn not in interpreted:
            interpreted[self.fn] = InterpretedFunction(self.fn)
        return interpreted[self.fn](*args, **kwargs)

    monkeypatch.setattr(JITFunction, "__call__", call)


@pytest.fixture(autouse=True)
def _interpreter_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Kernel tests see the interpreter switch on CPU, the automatic kernel choice and fixed tiles."""
    if not ON_GPU:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    if TRITON_PREIMPORTED:
        _interpret_compiled_library(monkeypatch)
    monkeypatch.delenv("APPLIANCE_KERNEL", raising=False)
    # Fixed tiles keep a compiled run to one compilation per shape; the autotuned launch has its own test.
    monkeypatch.setenv("APPLIANCE_KERNEL_AUTOTUNE", "0")
    yield


@pytest.fixture
def device() -> torch.device:
    return DEVICE


@pytest.fixture
def gen(request: pytest.FixtureRequest) -> torch.Generator:
    """A generator seeded from the test's id: fresh inputs for every check, same inputs every run."""
    return torch.Generator().manual_seed(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture
def tolerances() -> dict[torch.dtype, tuple[float, float]]:
    return TOLERANCES
