"""The checks a workflow needs the stores for: every model exists (at its pinned version when it
pins one) and is of the kind its step needs, every label a condition names is one its model can
produce, every slot a template or condition names is one its extractor knows, and every dataset a
retrieve step names is in the dataset store."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from appliance.artifact.manifest import SpecialistManifest
from appliance.errors import ApplianceError
from appliance.store import ModelStore
from appliance.workflows.spec import (
    BranchStep,
    ExtractStep,
    GenerateStep,
    Kind,
    RetrieveStep,
    WorkflowSpec,
    field_names,
    model_steps,
)

Located = tuple[tuple[str | int, ...], str]
# A retrieve step's dataset: None when the dataset store has it, else why not.
DatasetCheck = Callable[[str], str | None]

_KIND_NEEDS = {
    Kind.CLASSIFY: ("classifier",),
    Kind.EXTRACT: ("span_extractor",),
    Kind.EMBED: ("classifier", "span_extractor"),
    Kind.RETRIEVE: ("classifier", "span_extractor"),
}


@dataclass(frozen=True)
class ResolvedModel:
    """What publishing learnt about a step's model: the version checked and what it produces."""

    name: str
    version: int
    kind: str
    labels: tuple[str, ...]  # classes (with the out-of-scope label, if any) or slot names


def producible_labels(spec: SpecialistManifest) -> tuple[str, ...]:
    labels = tuple(spec.labels)
    return (*labels, spec.oos.label) if spec.oos is not None else labels


def resolve_models(spec: WorkflowSpec, models: ModelStore) -> tuple[dict[str, ResolvedModel], list[Located]]:
    """Each model step's model, checked against the store: (step id → model, problems)."""
    resolved: dict[str, ResolvedModel] = {}
    problems: list[Located] = []
    for i, step in model_steps(spec):
        where = ("steps", i, "model")
        try:
            manifest = models.load(step.model, verify=False).spec
        except ApplianceError as exc:
            problems.append((where, f"step {step.id!r}: model {step.model!r}: {exc.message}"))
            continue
        kind = Kind(step.kind)
        if manifest.kind not in _KIND_NEEDS[kind]:
            needed = " or ".join(_KIND_NEEDS[kind])
            problems.append(
                (
                    where,
                    f"step {step.id!r}: a {kind} step needs a {needed}, "
                    f"and {step.model!r} is a {manifest.kind}",
                )
            )
            continue
        resolved[step.id] = ResolvedModel(
            manifest.name, manifest.version, manifest.kind, producible_labels(manifest)
        )
    return resolved, problems


def check(
    spec: WorkflowSpec, models: ModelStore, datasets: DatasetCheck | None = None
) -> tuple[dict[str, ResolvedModel], list[Located]]:
    """Every store-dependent problem of ``spec``, located by its path in the document."""
    resolved, problems = resolve_models(spec, models)
    index = {s.id: i for i, s in enumerate(spec.steps)}
    for i, step in enumerate(spec.steps):
        if isinstance(step, BranchStep):
            for j, condition in enumerate(step.when):
                model = resolved.get(condition.step)
                if model is None:
                    continue  # its step's own problem is reported already
                asked = condition.label_in or ((condition.field_present,) if condition.field_present else ())
                problems += [
                    (("steps", i, "when", j), _unknown_label(step.id, condition.step, model, label))
                    for label in asked
                    if label not in model.labels
                ]
        if isinstance(step, GenerateStep):
            for ref, field in step.placeholders():
                model = resolved.get(ref)
                target = spec.steps[index[ref]] if ref in index else None
                if field is None or model is None or not isinstance(target, ExtractStep):
                    continue
                if field not in field_names(target, model.labels):
                    problems.append(
                        (
                            ("steps", i, "prompt"),
                            f"step {step.id!r}: prompt names {{{{{ref}.{field}}}}}, but model {model.name!r} "
                            f"extracts {', '.join(model.labels)} (and spans)",
                        )
                    )
        if isinstance(step, RetrieveStep):
            why = datasets(step.dataset) if datasets is not None else "no dataset store on this appliance"
            if why is not None:
                problems.append(
                    (("steps", i, "dataset"), f"step {step.id!r}: dataset {step.dataset!r}: {why}")
                )
    return resolved, problems


def _unknown_label(step_id: str, target: str, model: ResolvedModel, label: str) -> str:
    what = "label" if model.kind == "classifier" else "slot"
    known = ", ".join(model.labels[:12]) + (", ..." if len(model.labels) > 12 else "")
    return (
        f"branch {step_id!r}: {model.name}:{model.version} (step {target!r}) cannot produce {what} "
        f"{label!r}; it knows {known}"
    )
