"""The generalist: a local LLM on vLLM, for open generation and zero-shot classification.

One :class:`GeneralistEngine` owns one vLLM ``AsyncLLM`` (its engine core runs in a child
process). The engine checks every request before it reaches vLLM, so that callers get a precise
error instead of a vLLM one:

- a prompt that cannot fit the model window is ``InvalidArgument``, with the token counts (the
  window is :meth:`GeneralistArgs.window`: the model folder's own bound, 2048 at most by default);
- more than ``max_concurrency`` requests in flight is ``ResourceExhausted`` at once (no queue:
  the router would rather answer with the specialist than wait);
- a dead engine core is ``Unavailable``; :meth:`GeneralistEngine.restart` brings it back, and a
  Serve replica fails its health check so that Serve replaces it.

Zero-shot classification constrains the output to exactly one label with vLLM's structured
outputs (``choice``), so the answer is always a member of the label set. Field extraction
constrains it with a JSON schema (:func:`span_schema`): a list of ``{label, text}`` whose labels
are the extractor's slots; whether each text is really in the input is the router's check.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import math
import os
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from appliance.config import apply_offline_env
from appliance.engines.generalist_api import (
    DEFAULT_MAX_TOKENS,
    Demonstration,
    Generalist,
    GenerationChunk,
    Placement,
    SpanAnswer,
    SpanClaim,
    ZeroShotResult,
)
from appliance.engines.generalist_args import GeneralistArgs
from appliance.engines.model_pin import verify_model
from appliance.errors import ApplianceError, InvalidArgument, ResourceExhausted, Unavailable

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase
    from vllm import RequestOutput, SamplingParams
    from vllm.config.model import ModelDType
    from vllm.logprobs import LogprobsOnePosition
    from vllm.v1.engine.async_llm import AsyncLLM

GiB = 1 << 30
MAX_STOP_SEQUENCES = 16
# Extraction answers: at most this many spans of at most this many characters each. Slots are a
# few words; the bounds keep the worst-case answer, and so its token budget, small.
MAX_SPANS = 8
MAX_SPAN_CHARS = 48
# A JSON string spends at most 6 bytes on a character (a \uXXXX escape).
JSON_BYTES_PER_CHAR = 6
CHAT_ROLES = frozenset({"system", "user", "assistant"})


class GeneralistEngine(Generalist):
    """One vLLM engine, started and stopped explicitly (or as an async context manager)."""

    def __init__(self, args: GeneralistArgs) -> None:
        self.args = args
        self.model_path = Path(args.path)
        # Checked here, before vLLM spends seconds loading weights only to refuse the window.
        self.max_model_len = args.window()
        self.max_concurrency = args.max_concurrency
        self.start_seconds: float | None = None  # how long the last start took
        self._engine: AsyncLLM | None = None
        self._tokenizer: PreTrainedTokenizerBase | None = None
        self._in_flight = 0
        self._lifecycle = asyncio.Lock()

    # ----------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        async with self._lifecycle:
            if self._engine is not None:
                return
            began = time.perf_counter()
            # Off the event loop: building the engine loads weights and waits for the engine
            # core process (tens of seconds), and the loop must keep serving health checks.
            await asyncio.to_thread(self._build_engine)
            self.start_seconds = time.perf_counter() - began

    def _build_engine(self) -> None:
        """Create the vLLM engine into ``self._engine``.

        It is stored, not returned: the worker thread's finished frame was seen to stay
        reachable, and as a return value the engine in it was never freed after shutdown.
        """
        # A changed weight or config file stops the start here, before vLLM reads any of them.
        verify_model(self.model_path)
        # The engine core and its workers inherit os.environ: no telemetry, no hub.
        apply_offline_env()
        from vllm.config.structured_outputs import StructuredOutputsConfig
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.platforms import current_platform
        from vllm.v1.engine.async_llm import AsyncLLM

        settings = self.args
        kv_cache: dict[str, Any] = {}
        # No dtype: float32 on CPU, the checkpoint's own dtype on GPU. vLLM-CPU would downcast to
        # bfloat16, and its bfloat16 kernels died with SIGILL on a VM that reports AMX/AVX512-BF16
        # (float32 ran on the same VM).
        dtype = settings.dtype or ("float32" if current_platform.is_cpu() else "auto")
        if current_platform.is_cpu():
            # vLLM-CPU sizes its KV cache from this variable, in whole GiB.
            os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(max(1, math.ceil(settings.kv_cache_gib)))
        else:
            kv_cache["kv_cache_memory_bytes"] = int(settings.kv_cache_gib * GiB)
        args = AsyncEngineArgs(
            model=str(self.model_path),
            tokenizer=str(self.model_path),
            max_model_len=self.max_model_len,
            max_num_seqs=self.max_concurrency,
            tensor_parallel_size=settings.tensor_parallel_size,
            # Eager mode skips torch.compile (and CUDA graphs): a faster start, slower decoding.
            enforce_eager=settings.enforce_eager,
            dtype=cast("ModelDType", dtype),  # a caller's name; vLLM validates it
            seed=settings.seed,
            # The model folder's sampling defaults apply only to vLLM's own HTTP server; ours
            # come from each request.
            generation_config="vllm",
            disable_log_stats=True,
            enable_log_requests=False,
            # JSON answers without whitespace between tokens: an extraction's token budget counts
            # none, and a weak model would otherwise spend it on blanks (an engine-wide setting,
            # xgrammar's; it takes the label choices and JSON schemas this engine sends).
            structured_outputs_config=StructuredOutputsConfig(
                backend="xgrammar", disable_any_whitespace=True
            ),
            **kv_cache,
        )
        self._engine = AsyncLLM.from_engine_args(args)

    async def stop(self) -> None:
        async with self._lifecycle:
            engine, self._engine = self._engine, None
            if engine is None:
                return
            # Stop reading outputs first: vLLM stops the engine core before it cancels this
            # task, which would then log the core's exit as a failure.
            handler = engine.output_handler
            if handler is not None:
                handler.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await handler
            # Blocking: it waits for the engine core and its workers to exit. The engine travels
            # in a list that the thread empties, so no frame is left holding it.
            await asyncio.to_thread(_shut_down, [engine])
            del engine
            # The engine sits in reference cycles; collect it now rather than at interpreter
            # exit, when its finaliser can no longer run cleanly.
            gc.collect()

    async def restart(self) -> None:
        """Replace a dead (or live) engine with a fresh one."""
        await self.stop()
        await self.start()

    async def __aenter__(self) -> GeneralistEngine:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    @property
    def ready(self) -> bool:
        return self._engine is not None and not self._engine.errored

    @property
    def placement(self) -> Placement:
        """On a GPU box the engine holds its tensor-parallel GPUs; on CPU, the box's cores."""
        from vllm.platforms import current_platform

        if current_platform.is_cpu():
            return Placement(accelerator=False)
        return Placement(accelerator=True, units=self.args.tensor_parallel_size)

    @property
    def in_flight(self) -> int:
        return self._in_flight

    async def check_health(self) -> None:
        """Raise ``Unavailable`` unless the engine is started and its core is alive."""
        engine = self._require_engine()
        try:
            await engine.check_health()
        except Exception as e:
            raise Unavailable(f"the generalist engine is dead: {e}") from e

    def _require_engine(self) -> AsyncLLM:
        if self._engine is None:
            raise Unavailable("the generalist engine is not started")
        if self._engine.errored:
            raise Unavailable("the generalist engine is dead; it must be restarted")
        return self._engine

    # ----------------------------------------------------------------- tokenizer

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        """The model's own tokenizer, loaded on first use (needs no running engine)."""
        if self._tokenizer is None:
            apply_offline_env()
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        return self._tokenizer

    def _render_chat(self, messages: Sequence[Mapping[str, str]]) -> str:
        tok = self.tokenizer
        if tok.chat_template:
            rendered = tok.apply_chat_template(
                [dict(m) for m in messages], tokenize=False, add_generation_prompt=True
            )
            return str(rendered)
        # A base model without a template: a plain transcript that ends on the assistant's turn.
        lines = [f"{m['role']}: {m['content']}" for m in messages]
        return "\n".join([*lines, "assistant:"])

    def _encode(self, prompt: str | None, messages: Sequence[Mapping[str, str]] | None) -> list[int]:
        if (prompt is None) == (messages is None):
            raise InvalidArgument("give exactly one of prompt or messages")
        if prompt is not None:
            if not isinstance(prompt, str) or not prompt:
                raise InvalidArgument("prompt must be a non-empty string")
            ids = self.tokenizer(prompt, add_special_tokens=True)["input_ids"]
        else:
            _check_messages(messages)
            assert messages is not None
            # The chat template writes its own special tokens (BOS and turn markers).
            ids = self.tokenizer(self._render_chat(messages), add_special_tokens=False)["input_ids"]
        return list(ids)

    def _room_for_output(self, prompt_tokens: int, what: str) -> int:
        """Tokens left in the window after the prompt; InvalidArgument if not even one."""
        room = self.max_model_len - prompt_tokens
        if room < 1:
            raise InvalidArgument(
                f"{what} is {prompt_tokens} tokens; the generalist's window is {self.max_model_len} "
                "tokens and must hold the prompt plus at least one generated token"
            )
        return room

    # ----------------------------------------------------------------- admission

    @contextlib.contextmanager
    def _slot(self) -> Iterator[None]:
        if self._in_flight >= self.max_concurrency:
            raise ResourceExhausted(
                f"the generalist is serving {self._in_flight} requests, its limit; retry later"
            )
        self._in_flight += 1
        try:
            yield
        finally:
            self._in_flight -= 1

    async def _submit(
        self, engine: AsyncLLM, ids: list[int], params: SamplingParams, request_id: str
    ) -> AsyncIterator[RequestOutput]:
        """vLLM's output stream, with its errors turned into appliance errors."""
        from vllm.exceptions import VLLMValidationError
        from vllm.inputs import tokens_input
        from vllm.v1.engine.exceptions import EngineDeadError

        try:
            # aclosing: when our caller stops early, vLLM's generator is closed now, which
            # aborts the request in the engine instead of whenever it is garbage collected.
            async with contextlib.aclosing(engine.generate(tokens_input(ids), params, request_id)) as outs:
                async for out in outs:
                    yield out
        except EngineDeadError as e:
            raise Unavailable("the generalist engine died during the request") from e
        except VLLMValidationError as e:
            raise InvalidArgument(f"the generalist rejected the request: {e}") from e

    # ----------------------------------------------------------------- generation

    async def generate(
        self,
        prompt: str | None = None,
        messages: Sequence[Mapping[str, str]] | None = None,
        max_tokens: int | None = None,
        temperature: float = 0.0,
        stop: Sequence[str] | None = None,
        request_id: str | None = None,
    ) -> AsyncIterator[GenerationChunk]:
        """Stream a completion of ``prompt`` (raw text) or ``messages`` (chat turns).

        Yields text deltas; the last chunk has ``finished=True`` and the usage. ``max_tokens`` is
        capped by what the window leaves after the prompt (the last chunk then says "length").
        """
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        engine = self._require_engine()
        if max_tokens is None:
            max_tokens = DEFAULT_MAX_TOKENS
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            raise InvalidArgument(f"max_tokens must be a positive integer, got {max_tokens!r}")
        if not (isinstance(temperature, int | float) and 0.0 <= temperature <= 2.0):
            raise InvalidArgument(f"temperature must be between 0 and 2, got {temperature!r}")
        stops = list(stop or [])
        if len(stops) > MAX_STOP_SEQUENCES or not all(isinstance(s, str) and s for s in stops):
            raise InvalidArgument(f"stop must be at most {MAX_STOP_SEQUENCES} non-empty strings")
        ids = self._encode(prompt, messages)
        room = self._room_for_output(len(ids), "the prompt")
        params = SamplingParams(
            max_tokens=min(max_tokens, room),
            temperature=float(temperature),
            stop=stops or None,
            output_kind=RequestOutputKind.DELTA,
        )
        with self._slot():
            began = time.perf_counter()
            completion_tokens = 0
            async for out in self._submit(engine, ids, params, request_id or _new_id("gen")):
                delta = out.outputs[0]
                completion_tokens += len(delta.token_ids)
                if out.finished:
                    yield GenerationChunk(
                        text=delta.text,
                        finished=True,
                        finish_reason=delta.finish_reason,
                        prompt_tokens=len(ids),
                        completion_tokens=completion_tokens,
                        engine_seconds=time.perf_counter() - began,
                    )
                elif delta.text:
                    yield GenerationChunk(text=delta.text)

    # ----------------------------------------------------------------- classification

    def _classification_prompt(
        self,
        text: str,
        labels: Sequence[str],
        descriptions: Mapping[str, str] | None,
        demonstrations: Sequence[Demonstration] = (),
    ) -> list[int]:
        body = classification_body(text, labels, descriptions, demonstrations)
        if self.tokenizer.chat_template:
            return self._encode(None, [{"role": "user", "content": body}])
        return self._encode(f"{body}\nLabel:", None)

    @staticmethod
    def _label_budget(labels: Sequence[str]) -> int:
        """Generated tokens that always suffice for any label, plus the end-of-sequence token.

        Constrained decoding may spell a label with other tokens than the tokenizer would; no
        byte-level or byte-fallback tokenizer needs more tokens than the label has UTF-8 bytes.
        """
        return max(len(label.encode("utf-8")) for label in labels) + 1

    async def check_label_set(
        self, labels: Sequence[str], descriptions: Mapping[str, str] | None = None
    ) -> None:
        """Raise ``InvalidArgument`` if this label set cannot be used for zero-shot classification.

        Call it when a policy is set up, not per request: the labels must be distinct non-empty
        strings, descriptions may only name labels, and the prompt for an empty text plus the
        longest label must fit the model window.
        """
        _check_labels(labels, descriptions)
        prompt_tokens = len(self._classification_prompt("", labels, descriptions))
        needed = prompt_tokens + self._label_budget(labels)
        if needed > self.max_model_len:
            raise InvalidArgument(
                f"the zero-shot prompt for {len(labels)} labels needs {needed} tokens ({prompt_tokens} "
                f"for the prompt, {needed - prompt_tokens} for the answer) before any text; the "
                f"generalist's window is {self.max_model_len} tokens. Use fewer labels or shorter "
                "descriptions."
            )

    async def classify(
        self,
        text: str,
        labels: Sequence[str],
        descriptions: Mapping[str, str] | None = None,
        request_id: str | None = None,
        demonstrations: Sequence[Demonstration] = (),
    ) -> ZeroShotResult:
        """Pick exactly one of ``labels`` for ``text`` (greedy, output constrained to the labels),
        shown ``demonstrations`` (labelled examples) first when there are any."""
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams

        engine = self._require_engine()
        if not isinstance(text, str) or not text.strip():
            raise InvalidArgument("text must be a non-empty string")
        _check_labels(labels, descriptions)
        ids = self._classification_prompt(text, labels, descriptions, demonstrations)
        budget = self._label_budget(labels)
        room = self._room_for_output(len(ids), "the zero-shot prompt with this text")
        if room < budget:
            raise InvalidArgument(
                f"the zero-shot prompt with this text is {len(ids)} tokens and the answer may need "
                f"{budget}; the generalist's window is {self.max_model_len} tokens. Shorten the text."
            )
        params = SamplingParams(
            max_tokens=budget,
            temperature=0.0,
            logprobs=0,  # only the chosen token's log-probability
            structured_outputs=StructuredOutputsParams(choice=list(labels)),
            output_kind=RequestOutputKind.FINAL_ONLY,
        )
        with self._slot():
            began = time.perf_counter()
            final: RequestOutput | None = None
            async for out in self._submit(engine, ids, params, request_id or _new_id("zs")):
                final = out
            seconds = time.perf_counter() - began
        if final is None:
            raise Unavailable("the generalist engine ended the request without an answer")
        answer = final.outputs[0]
        if answer.text not in labels:
            # The grammar should make this impossible; say so rather than guess a label.
            raise ApplianceError(
                f"constrained output {answer.text!r} is not one of the labels "
                f"(finish reason {answer.finish_reason})"
            )
        # logprobs=0 gives every generated token one entry (vLLM's container is typed as optional).
        steps = cast("Sequence[LogprobsOnePosition]", answer.logprobs or [])
        logprob = sum(step[token].logprob for token, step in zip(answer.token_ids, steps, strict=True))
        return ZeroShotResult(
            label=answer.text,
            confidence=min(1.0, math.exp(logprob)),
            prompt_tokens=len(ids),
            completion_tokens=len(answer.token_ids),
            engine_seconds=seconds,
        )

    # ----------------------------------------------------------------- extraction

    def _extraction_prompt(
        self, text: str, labels: Sequence[str], descriptions: Mapping[str, str] | None
    ) -> list[int]:
        described = descriptions or {}
        slot_lines = "\n".join(
            f"- {label}: {described[label]}" if described.get(label) else f"- {label}" for label in labels
        )
        body = (
            "Find the fields of the text. Copy each field's words exactly as they appear in the text.\n\n"
            f"Slots:\n{slot_lines}\n\n"
            f"Text: {text}\n\n"
            'Answer in JSON: {"spans": [{"label": "<slot>", "text": "<the words>"}]}, in text order, '
            "with an empty list when the text holds none."
        )
        if self.tokenizer.chat_template:
            return self._encode(None, [{"role": "user", "content": body}])
        return self._encode(f"{body}\nJSON:", None)

    async def extract(
        self,
        text: str,
        labels: Sequence[str],
        descriptions: Mapping[str, str] | None = None,
        request_id: str | None = None,
    ) -> SpanAnswer:
        """The fields of ``text`` (greedy; output constrained to :func:`span_schema` over ``labels``).

        As many spans are allowed as the window leaves room for, up to :data:`MAX_SPANS`;
        InvalidArgument when not even one fits.
        """
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams

        engine = self._require_engine()
        if not isinstance(text, str) or not text.strip():
            raise InvalidArgument("text must be a non-empty string")
        _check_labels(labels, descriptions, minimum=1)
        ids = self._extraction_prompt(text, labels, descriptions)
        room = self._room_for_output(len(ids), "the extraction prompt with this text")
        max_chars = min(len(text), MAX_SPAN_CHARS)
        max_spans = MAX_SPANS
        while max_spans > 0 and span_budget(labels, max_spans, max_chars) > room:
            max_spans -= 1
        if max_spans == 0:
            raise InvalidArgument(
                f"the extraction prompt with this text is {len(ids)} tokens and one span may need "
                f"{span_budget(labels, 1, max_chars)}; the generalist's window is {self.max_model_len} "
                "tokens. Shorten the text."
            )
        schema = span_schema(labels, max_spans, max_chars)
        params = SamplingParams(
            max_tokens=span_budget(labels, max_spans, max_chars),
            temperature=0.0,
            logprobs=0,
            # No whitespace between JSON tokens (the engine's setting): the budget above counts none.
            structured_outputs=StructuredOutputsParams(json=schema),
            output_kind=RequestOutputKind.FINAL_ONLY,
        )
        with self._slot():
            began = time.perf_counter()
            final: RequestOutput | None = None
            async for out in self._submit(engine, ids, params, request_id or _new_id("ex")):
                final = out
            seconds = time.perf_counter() - began
        if final is None:
            raise Unavailable("the generalist engine ended the request without an answer")
        answer = final.outputs[0]
        claims = parse_span_answer(answer.text, labels)
        steps = cast("Sequence[LogprobsOnePosition]", answer.logprobs or [])
        logprob = sum(step[token].logprob for token, step in zip(answer.token_ids, steps, strict=True))
        return SpanAnswer(
            spans=claims,
            confidence=min(1.0, math.exp(logprob)),
            prompt_tokens=len(ids),
            completion_tokens=len(answer.token_ids),
            engine_seconds=seconds,
        )


def classification_body(
    text: str,
    labels: Sequence[str],
    descriptions: Mapping[str, str] | None,
    demonstrations: Sequence[Demonstration] = (),
) -> str:
    """The zero-shot instruction; with demonstrations, a few-shot one (examples before the text)."""
    described = descriptions or {}
    label_lines = "\n".join(
        f"- {label}: {described[label]}" if described.get(label) else f"- {label}" for label in labels
    )
    examples = ""
    if demonstrations:
        shown = "\n\n".join(f"Text: {d.text}\nLabel: {d.label}" for d in demonstrations)
        examples = f"Labelled examples:\n\n{shown}\n\n"
    return (
        "Classify the text into exactly one of these labels.\n\n"
        f"Labels:\n{label_lines}\n\n"
        f"{examples}"
        f"Text: {text}\n\n"
        "Answer with the label only."
    )


def span_schema(labels: Sequence[str], max_spans: int, max_chars: int) -> dict[str, Any]:
    """The JSON schema of an extraction answer: ``{"spans": [{"label": <slot>, "text": ...}]}``."""
    span = {
        "type": "object",
        "properties": {
            "label": {"enum": list(labels)},
            "text": {"type": "string", "minLength": 1, "maxLength": max_chars},
        },
        "required": ["label", "text"],
        "additionalProperties": False,
    }
    return {
        "type": "object",
        "properties": {"spans": {"type": "array", "items": span, "maxItems": max_spans}},
        "required": ["spans"],
        "additionalProperties": False,
    }


def span_budget(labels: Sequence[str], max_spans: int, max_chars: int) -> int:
    """Generated tokens that always suffice for the longest answer :func:`span_schema` allows
    (written without whitespace), plus the end-of-sequence token. As for labels, no byte-level or
    byte-fallback tokenizer needs more tokens than the answer has UTF-8 bytes."""
    # A label is written as JSON, escaped or not: count the longer spelling.
    label = max(len(json.dumps(x).encode()) for x in labels)
    label = max(label, *(len(json.dumps(x, ensure_ascii=False).encode()) for x in labels))
    item = len('{"label":,"text":""}') + label + JSON_BYTES_PER_CHAR * max_chars
    return len('{"spans":[]}') + max_spans * item + (max_spans - 1) + 1


def parse_span_answer(answer: str, labels: Sequence[str]) -> list[SpanClaim]:
    """The spans of a schema-constrained answer; ApplianceError if it is not one (the grammar
    should make that impossible: say so rather than guess)."""
    try:
        # strict=False: xgrammar's JSON strings admit raw control characters, which strict JSON does not.
        items = json.loads(answer, strict=False)["spans"]
        claims = [SpanClaim(label=item["label"], text=item["text"]) for item in items]
    except (ValueError, KeyError, TypeError) as e:
        raise ApplianceError(f"constrained output {answer[:200]!r} is not an extraction answer: {e}") from e
    known = set(labels)
    if not all(c.label in known and isinstance(c.text, str) for c in claims):
        raise ApplianceError(f"constrained output {answer[:200]!r} names a slot outside {sorted(known)}")
    return claims


def _shut_down(box: list[AsyncLLM]) -> None:
    box.pop().shutdown()


def _new_id(kind: str) -> str:
    return f"{kind}-{uuid.uuid4().hex[:16]}"


def _check_messages(messages: object) -> None:
    if not isinstance(messages, Sequence) or isinstance(messages, str) or not messages:
        raise InvalidArgument("messages must be a non-empty list of {role, content} objects")
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or m.get("role") not in CHAT_ROLES:
            raise InvalidArgument(f"messages[{i}].role must be one of {sorted(CHAT_ROLES)}")
        if not isinstance(m.get("content"), str):
            raise InvalidArgument(f"messages[{i}].content must be a string")


def _check_labels(labels: object, descriptions: Mapping[str, str] | None, minimum: int = 2) -> None:
    """``minimum``: a classification needs two labels to choose from; an extractor may have one slot."""
    if isinstance(labels, str) or not isinstance(labels, Sequence) or len(labels) < minimum:
        raise InvalidArgument(f"labels must be a list of at least {minimum} strings")
    if not all(isinstance(label, str) and label.strip() == label and label for label in labels):
        raise InvalidArgument("every label must be a non-empty string without surrounding whitespace")
    if len(set(labels)) != len(labels):
        raise InvalidArgument("labels must be distinct")
    unknown = sorted(set(descriptions or {}) - set(labels))
    if unknown:
        raise InvalidArgument(f"descriptions name labels not in the label set: {json.dumps(unknown)}")
