"""A workflow definition: the YAML format, read into typed models with located errors.

A workflow is a DAG of steps over one input text::

    name: support-ticket
    steps:
      - id: intent
        kind: classify
        model: banking77            # NAME or NAME:VERSION (a pinned version)
        policy: cascade             # specialist | cascade | generalist
        threshold: 0.8              # cascade at this confidence (default: the model's calibrated one)
        timeout: 2s
        on_failure: fallback        # fail (default) | skip | fallback
      - id: urgent
        kind: branch
        when: {step: intent, label_in: [lost_or_stolen_card, compromised_card]}
        then: [reply]
      - id: reply
        kind: generate
        prompt: "A customer wrote: {{input}} (intent {{intent.label}}). Reply in one sentence."

This module checks the shape of the document and everything that needs no store: unique step
ids, known references, templates naming only fields their step produces, no cycle. What needs the
store (models exist, labels in conditions are the model's) is :mod:`appliance.workflows.validate`.
Every problem is reported with ``file:line`` from the YAML node it came from, all at once.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from appliance.errors import InvalidArgument
from appliance.store import NAME_RE, parse_ref

SPEC_FORMAT = 1
STEP_ID_RE = re.compile(r"^[a-z][a-z0-9_]{0,39}$")
# {{input}}, {{step}} or {{step.field}}; whitespace inside the braces is allowed
TEMPLATE_RE = re.compile(r"\{\{\s*([A-Za-z_][\w-]*)(?:\.([\w-]+))?\s*\}\}")
MAX_STEPS = 64
INPUT = "input"
_DURATION_RE = re.compile(r"^([0-9]+(?:\.[0-9]+)?)(ms|s|m)?$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, None: 1.0}

# ------------------------------------------------------------------------------ errors


@dataclass(frozen=True)
class Problem:
    """One located mistake in a workflow file."""

    source: str
    line: int  # 1-based; 0 when the YAML gives no position
    message: str

    def __str__(self) -> str:
        return f"{self.source}:{self.line}: {self.message}" if self.line else f"{self.source}: {self.message}"


class WorkflowInvalid(InvalidArgument):
    """A workflow that cannot be published; ``problems`` lists every located mistake."""

    def __init__(self, problems: Sequence[Problem]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


# ------------------------------------------------------------------------------ the models


class Kind(enum.StrEnum):
    CLASSIFY = "classify"
    EXTRACT = "extract"
    GENERATE = "generate"
    EMBED = "embed"
    RETRIEVE = "retrieve"
    BRANCH = "branch"


class StepPolicy(enum.StrEnum):
    SPECIALIST = "specialist"  # the specialist only
    CASCADE = "cascade"  # the specialist, the generalist below the threshold
    GENERALIST = "generalist"  # the generalist only (optionally a named one)


class OnFailure(enum.StrEnum):
    FAIL = "fail"  # the run fails, naming the step and its status
    SKIP = "skip"  # the step's output is absent; steps that need it are skipped too
    FALLBACK = "fallback"  # the specialist answers (classify, extract), or fallback_text (generate)


# What a later step may name as ``{{step.field}}`` (and conditions read), per kind. An extract
# step also offers each of its model's slot labels (the first span's text), checked at publish.
FIELDS: Mapping[Kind, frozenset[str]] = {
    Kind.CLASSIFY: frozenset({"label", "confidence", "route"}),
    Kind.EXTRACT: frozenset({"spans"}),
    Kind.GENERATE: frozenset({"text"}),
    Kind.EMBED: frozenset({"dim"}),
    Kind.RETRIEVE: frozenset({"examples", "labels"}),
    Kind.BRANCH: frozenset({"taken"}),
}
DEFAULT_FIELD: Mapping[Kind, str] = {
    Kind.CLASSIFY: "label",
    Kind.EXTRACT: "spans",
    Kind.GENERATE: "text",
    Kind.EMBED: "dim",
    Kind.RETRIEVE: "examples",
    Kind.BRANCH: "taken",
}


def parse_duration(value: object) -> float:
    """Seconds from ``2``, ``2.5``, ``"500ms"``, ``"2s"`` or ``"1m"``."""
    if isinstance(value, bool):
        raise ValueError("a duration is a number of seconds or a string like 500ms, 2s, 1m")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and (match := _DURATION_RE.fullmatch(value.strip())):
        seconds = float(match.group(1)) * _DURATION_UNITS[match.group(2)]
    else:
        raise ValueError(f"invalid duration {value!r}: use seconds, or a string like 500ms, 2s, 1m")
    if not 0 < seconds <= 3600:
        raise ValueError(f"a duration must be above 0 and at most 1 hour, got {value!r}")
    return seconds


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, use_enum_values=False)


class Condition(_Strict):
    """One test on an earlier step's output; exactly one of the tests is set."""

    step: str
    label_in: tuple[str, ...] | None = Field(default=None, min_length=1)
    confidence_below: float | None = Field(default=None, ge=0.0, le=1.0)
    field_present: str | None = None

    @model_validator(mode="after")
    def _one_test(self) -> Condition:
        tests = [t for t in (self.label_in, self.confidence_below, self.field_present) if t is not None]
        if len(tests) != 1:
            raise ValueError("a condition has exactly one of label_in, confidence_below, field_present")
        return self


class _Step(_Strict):
    id: str
    after: tuple[str, ...] = ()  # explicit dependencies, beside those its references imply
    timeout: float | None = None  # seconds; the run's remaining time bounds it too
    on_failure: OnFailure = OnFailure.FAIL

    @field_validator("id")
    @classmethod
    def _valid_id(cls, value: str) -> str:
        if not STEP_ID_RE.fullmatch(value) or value == INPUT:
            raise ValueError(
                f"invalid step id {value!r}: 1-40 characters of a-z, 0-9, '_', starting with a letter "
                f"(and not {INPUT!r})"
            )
        return value

    @field_validator("timeout", mode="before")
    @classmethod
    def _duration(cls, value: object) -> float | None:
        return None if value is None else parse_duration(value)

    def references(self) -> Iterator[tuple[str, str | None]]:
        """(step, field or None) for every earlier output this step reads."""
        yield from ((step, None) for step in self.after)


class _ModelStep(_Step):
    model: str

    @field_validator("model")
    @classmethod
    def _model_ref(cls, value: str) -> str:
        try:
            parse_ref(value)
        except InvalidArgument as exc:
            raise ValueError(exc.message) from None
        return value

    @property
    def model_name(self) -> str:
        return parse_ref(self.model)[0]

    @property
    def pinned_version(self) -> int | None:
        return parse_ref(self.model)[1]


class ClassifyStep(_ModelStep):
    kind: Literal[Kind.CLASSIFY]
    policy: StepPolicy = StepPolicy.SPECIALIST
    threshold: float | None = Field(default=None, gt=0.0, le=1.0)
    generalist: str | None = None  # a named generalist; None: the default one
    top_k: int = Field(default=1, ge=1, le=20)

    @model_validator(mode="after")
    def _policy_fields(self) -> ClassifyStep:
        if self.threshold is not None and self.policy is not StepPolicy.CASCADE:
            raise ValueError("threshold applies to policy cascade only")
        if self.generalist is not None and self.policy is StepPolicy.SPECIALIST:
            raise ValueError("generalist applies to policy cascade or generalist only")
        return self


class ExtractStep(_ModelStep):
    kind: Literal[Kind.EXTRACT]
    policy: StepPolicy = StepPolicy.SPECIALIST


class EmbedStep(_ModelStep):
    kind: Literal[Kind.EMBED]

    @model_validator(mode="after")
    def _no_fallback(self) -> EmbedStep:
        if self.on_failure is OnFailure.FALLBACK:
            raise ValueError("an embed step has nothing to fall back to: use fail or skip")
        return self


class RetrieveStep(_ModelStep):
    """The ``k`` nearest labelled examples to the input, from a dataset in the dataset store,
    embedded by ``model``'s encoder."""

    kind: Literal[Kind.RETRIEVE]
    dataset: str = Field(min_length=1, max_length=200)
    k: int = Field(default=4, ge=1, le=64)

    @model_validator(mode="after")
    def _no_fallback(self) -> RetrieveStep:
        if self.on_failure is OnFailure.FALLBACK:
            raise ValueError("a retrieve step has nothing to fall back to: use fail or skip")
        return self


class GenerateStep(_Step):
    kind: Literal[Kind.GENERATE]
    prompt: str = Field(min_length=1, max_length=16_000)
    generalist: str | None = None
    max_tokens: int = Field(default=128, ge=1, le=4096)
    temperature: float = Field(default=0.0, ge=0.0, le=2.0)
    fallback_text: str | None = None  # the output when the step fails with on_failure: fallback

    @model_validator(mode="after")
    def _fallback_text(self) -> GenerateStep:
        if self.on_failure is OnFailure.FALLBACK and self.fallback_text is None:
            raise ValueError("on_failure: fallback on a generate step needs fallback_text")
        return self

    def placeholders(self) -> list[tuple[str, str | None]]:
        return [(m.group(1), m.group(2)) for m in TEMPLATE_RE.finditer(self.prompt)]

    def references(self) -> Iterator[tuple[str, str | None]]:
        yield from super().references()
        yield from ((step, field) for step, field in self.placeholders() if step != INPUT)


class BranchStep(_Step):
    """``then`` steps run when every condition holds, ``else`` steps when one does not; a step
    named by a branch runs only when that branch selects it."""

    kind: Literal[Kind.BRANCH]
    when: tuple[Condition, ...] = Field(min_length=1)
    then: tuple[str, ...] = ()
    otherwise: tuple[str, ...] = Field(default=(), alias="else")

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @field_validator("when", mode="before")
    @classmethod
    def _one_or_many(cls, value: object) -> object:
        return [value] if isinstance(value, Mapping) else value

    @model_validator(mode="after")
    def _targets(self) -> BranchStep:
        if not self.then and not self.otherwise:
            raise ValueError("a branch needs then or else steps")
        return self

    @property
    def targets(self) -> tuple[str, ...]:
        return self.then + self.otherwise

    def references(self) -> Iterator[tuple[str, str | None]]:
        yield from super().references()
        for condition in self.when:
            yield condition.step, None


Step = Annotated[
    ClassifyStep | ExtractStep | EmbedStep | RetrieveStep | GenerateStep | BranchStep,
    Field(discriminator="kind"),
]
ModelStep = ClassifyStep | ExtractStep | EmbedStep | RetrieveStep


class WorkflowSpec(_Strict):
    format: int = SPEC_FORMAT
    name: str
    description: str = ""
    timeout: float | None = None  # the whole run's deadline when the caller sets none
    steps: tuple[Step, ...] = Field(min_length=1, max_length=MAX_STEPS)

    @field_validator("name")
    @classmethod
    def _valid_name(cls, value: str) -> str:
        if not NAME_RE.fullmatch(value) or ".." in value:
            raise ValueError(
                f"invalid workflow name {value!r}: 1-63 characters of a-z, 0-9, '_', '-', '.', "
                "starting with a letter or digit"
            )
        return value

    @field_validator("format")
    @classmethod
    def _known_format(cls, value: int) -> int:
        if value != SPEC_FORMAT:
            raise ValueError(f"unknown workflow format {value} (this appliance reads format {SPEC_FORMAT})")
        return value

    @field_validator("timeout", mode="before")
    @classmethod
    def _duration(cls, value: object) -> float | None:
        return None if value is None else parse_duration(value)

    # ---------------------------------------------------------------- the graph
    def step(self, step_id: str) -> Step:
        for step in self.steps:
            if step.id == step_id:
                return step
        raise KeyError(step_id)

    @property
    def ids(self) -> list[str]:
        return [s.id for s in self.steps]

    def dependencies(self) -> dict[str, set[str]]:
        """Each step's direct dependencies: what it reads, ``after``, and the branch naming it."""
        deps: dict[str, set[str]] = {s.id: {ref for ref, _ in s.references()} for s in self.steps}
        for step in self.steps:
            if isinstance(step, BranchStep):
                for target in step.targets:
                    deps.setdefault(target, set()).add(step.id)
        return deps

    def gates(self) -> dict[str, list[tuple[str, bool]]]:
        """step id → the (branch id, outcome) pairs that must all hold for it to run."""
        out: dict[str, list[tuple[str, bool]]] = {}
        for step in self.steps:
            if isinstance(step, BranchStep):
                for target in step.then:
                    out.setdefault(target, []).append((step.id, True))
                for target in step.otherwise:
                    out.setdefault(target, []).append((step.id, False))
        return out

    def order(self) -> list[list[str]]:
        """Steps in waves: each wave depends only on earlier waves (the runner runs a wave's steps
        concurrently). Assumes a validated spec (no cycle)."""
        deps = self.dependencies()
        done: set[str] = set()
        waves: list[list[str]] = []
        while len(done) < len(deps):
            wave = [s for s in self.ids if s not in done and deps[s] <= done]
            if not wave:
                raise ValueError("cycle")
            waves.append(wave)
            done.update(wave)
        return waves

    def to_yaml(self) -> str:
        """The spec as a YAML document that :func:`load_spec_text` reads back to an equal spec."""
        data = self.model_dump(mode="json", by_alias=True, exclude_defaults=True)
        data = {"format": self.format, **data}
        return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)


# ------------------------------------------------------------------------------ loading


class _Marks:
    """Line numbers of the YAML nodes, by the path of keys and indexes that reaches them."""

    def __init__(self, root: yaml.Node | None) -> None:
        self.lines: dict[tuple[str | int, ...], int] = {}
        if root is not None:
            self._walk(root, ())

    def _walk(self, node: yaml.Node, path: tuple[str | int, ...]) -> None:
        self.lines[path] = node.start_mark.line + 1
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                name = key.value if isinstance(key, yaml.ScalarNode) else str(key.value)
                self.lines[(*path, name, "__key__")] = key.start_mark.line + 1
                self._walk(value, (*path, name))
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                self._walk(item, (*path, i))

    def line(self, path: Sequence[str | int]) -> int:
        """The line of the deepest node on ``path`` that the document has."""
        for cut in range(len(path), -1, -1):
            key = tuple(path[:cut])
            if key in self.lines:
                return self.lines[key]
        return 0


def load_spec(path: str | Path) -> WorkflowSpec:
    """Read and check a workflow file; :class:`WorkflowInvalid` lists every located problem."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise WorkflowInvalid([Problem(str(path), 0, f"not UTF-8 text ({exc.reason})")]) from None
    except OSError as exc:
        raise WorkflowInvalid([Problem(str(path), 0, f"cannot read: {exc.strerror}")]) from None
    return load_spec_text(text, source=str(path))


def load_spec_text(text: str, source: str = "<workflow>") -> WorkflowSpec:
    spec, _ = parse(text, source)
    return spec


def parse(text: str, source: str = "<workflow>") -> tuple[WorkflowSpec, _Marks]:
    """The spec and its node marks (for located errors in later checks)."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        reason = getattr(exc, "problem", None) or str(exc)
        raise WorkflowInvalid(
            [Problem(source, mark.line + 1 if mark else 0, f"not valid YAML: {reason}")]
        ) from None
    marks = _Marks(root)
    if not isinstance(data, dict):
        raise WorkflowInvalid(
            [Problem(source, marks.line(()), "a workflow is a YAML mapping with name and steps")]
        )
    try:
        spec = WorkflowSpec.model_validate(data)
    except ValidationError as exc:
        raise WorkflowInvalid(_located(exc, marks, source)) from None
    problems = [Problem(source, marks.line(loc), message) for loc, message in graph_problems(spec)]
    if problems:
        raise WorkflowInvalid(problems)
    return spec, marks


def _located(exc: ValidationError, marks: _Marks, source: str) -> list[Problem]:
    problems = []
    for error in exc.errors():
        # pydantic puts the union member's tag in the location (steps.0.classify.model): drop it
        loc = tuple(p for p in error["loc"] if p not in {k.value for k in Kind})
        where = ".".join(str(p) for p in loc)
        message = str(error["msg"]).removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            message = f"unknown field {loc[-1]!r}"
            loc = (*loc, "__key__")
        elif error["type"] == "union_tag_invalid":
            message = f"unknown step kind; expected one of {', '.join(k.value for k in Kind)}"
            loc = (*loc, "kind")
        elif error["type"] == "union_tag_not_found":
            message = "a step needs a kind"
        problems.append(Problem(source, marks.line(loc), f"{where}: {message}" if where else message))
    return problems


def graph_problems(spec: WorkflowSpec) -> list[tuple[tuple[str | int, ...], str]]:
    """Problems with the steps' references that need no store: (location, message) pairs."""
    problems: list[tuple[tuple[str | int, ...], str]] = []
    index = {s.id: i for i, s in enumerate(spec.steps)}
    seen: set[str] = set()
    for i, step in enumerate(spec.steps):
        if step.id in seen:
            problems.append((("steps", i, "id"), f"duplicate step id {step.id!r}"))
        seen.add(step.id)
    for i, step in enumerate(spec.steps):
        at: tuple[str | int, ...] = ("steps", i)
        for ref in step.after:
            if ref not in index:
                problems.append(((*at, "after"), f"step {step.id!r}: after names unknown step {ref!r}"))
        if isinstance(step, GenerateStep):
            for ref, field in step.placeholders():
                problems += [
                    ((*at, "prompt"), m) for m in _template_problems(spec, index, step.id, ref, field)
                ]
        if isinstance(step, BranchStep):
            for j, condition in enumerate(step.when):
                problems += [
                    ((*at, "when", j), m) for m in _condition_problems(spec, index, step.id, condition)
                ]
            for key, targets in (("then", step.then), ("else", step.otherwise)):
                for target in targets:
                    if target not in index:
                        problems.append(
                            ((*at, key), f"branch {step.id!r}: {key} names unknown step {target!r}")
                        )
                    elif target == step.id:
                        problems.append(((*at, key), f"branch {step.id!r} names itself"))
    # a step naming itself is reported above already
    cycle = find_cycle({step: deps - {step} for step, deps in spec.dependencies().items()})
    if cycle:
        problems.append((("steps", index[cycle[0]], "id"), f"steps form a cycle: {' -> '.join(cycle)}"))
    return problems


def _template_problems(
    spec: WorkflowSpec, index: Mapping[str, int], step_id: str, ref: str, field: str | None
) -> list[str]:
    shown = f"{{{{{ref}{'.' + field if field else ''}}}}}"
    if ref == INPUT:
        return [f"step {step_id!r}: prompt names {shown}, but the input has no fields"] if field else []
    if ref not in index:
        return [f"step {step_id!r}: prompt names {shown}, an unknown step"]
    if ref == step_id:
        return [f"step {step_id!r}: prompt names its own output {shown}"]
    target = spec.steps[index[ref]]
    if field is not None and field not in FIELDS[Kind(target.kind)] and not isinstance(target, ExtractStep):
        fields = ", ".join(sorted(FIELDS[Kind(target.kind)]))
        return [f"step {step_id!r}: prompt names {shown}, but a {target.kind} step has fields {fields}"]
    return []  # an extract step's slot names are checked against its model at publish


def _condition_problems(
    spec: WorkflowSpec, index: Mapping[str, int], step_id: str, c: Condition
) -> list[str]:
    if c.step not in index:
        return [f"branch {step_id!r}: condition on unknown step {c.step!r}"]
    target = spec.steps[index[c.step]]
    if (c.label_in is not None or c.confidence_below is not None) and not isinstance(target, ClassifyStep):
        test = "label_in" if c.label_in is not None else "confidence_below"
        return [f"branch {step_id!r}: {test} needs a classify step, and {c.step!r} is a {target.kind} step"]
    if c.field_present is not None and not isinstance(target, ExtractStep):
        return [
            f"branch {step_id!r}: field_present needs an extract step, and {c.step!r} is a {target.kind} step"
        ]
    return []


def find_cycle(deps: Mapping[str, set[str]]) -> list[str]:
    """One cycle (its first node repeated at the end), or [] when the graph has none."""
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    path: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = 1
        path.append(node)
        for dep in sorted(deps.get(node, ())):
            if state.get(dep) == 1:
                return [*path[path.index(dep) :], dep]
            if dep not in state and (found := visit(dep)):
                return found
        path.pop()
        state[node] = 2
        return []

    for node in deps:
        if node not in state and (found := visit(node)):
            return found
    return []


def model_steps(spec: WorkflowSpec) -> Iterator[tuple[int, ModelStep]]:
    for i, step in enumerate(spec.steps):
        if isinstance(step, ClassifyStep | ExtractStep | EmbedStep | RetrieveStep):
            yield i, step


def field_names(step: Step, labels: Sequence[str] = ()) -> frozenset[str]:
    """What ``{{step.field}}`` may name; an extract step's slot labels come from its model."""
    return FIELDS[Kind(step.kind)] | (frozenset(labels) if isinstance(step, ExtractStep) else frozenset())


def as_dict(spec: WorkflowSpec) -> dict[str, Any]:
    return spec.model_dump(mode="json", by_alias=True)
