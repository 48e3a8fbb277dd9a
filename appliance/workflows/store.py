"""Published workflows: versioned, hashed and signed exactly as models are.

Layout under ``$APPLIANCE_HOME``::

    workflows/<name>/<version>/workflow.yaml    the definition as it was published
    workflows/<name>/<version>/manifest.json    its sha256, the checked model versions, the spec
    workflows/<name>/<version>/manifest.sig     ed25519, by the same key and trust as models

The model store's versioning, atomic publish, signing and verification are reused as they are
(:class:`WorkflowStore` is a :class:`~appliance.store.ModelStore` rooted at ``workflows/``), so
there is one way to sign an artifact and one way to trust it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from appliance import config
from appliance.errors import IntegrityError, NotFound
from appliance.store import Manifest, ModelStore
from appliance.workflows.spec import (
    Problem,
    WorkflowInvalid,
    WorkflowSpec,
    as_dict,
    load_spec_text,
    parse,
)
from appliance.workflows.validate import DatasetCheck, check

WORKFLOW_FILE = "workflow.yaml"
ARTIFACT_KIND = "workflow"


class WorkflowStore(ModelStore):
    """The model store's machinery over ``$APPLIANCE_HOME/workflows``."""

    def __init__(self, home: Path | None = None, *, require_signature: bool = True) -> None:
        super().__init__(home or config.appliance_home(), require_signature=require_signature)
        self.models_root = self.home / "workflows"

    def resolve(self, ref: str) -> tuple[str, int]:
        try:
            return super().resolve(ref)
        except NotFound as exc:  # the model store's message names models
            raise NotFound(exc.message.replace("model", "workflow", 1)) from None


@dataclass(frozen=True)
class StoredWorkflow:
    """A verified workflow version: its spec and the model versions publishing checked."""

    manifest: Manifest
    spec: WorkflowSpec

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def version(self) -> int:
        return self.manifest.version

    @property
    def ref(self) -> str:
        return f"{self.name}:{self.version}"

    @property
    def text(self) -> str:
        return (self.manifest.folder / WORKFLOW_FILE).read_text(encoding="utf-8")


def load(ref: str, store: WorkflowStore | None = None, *, verify: bool = True) -> StoredWorkflow:
    """A published workflow (``NAME`` is the newest version), its files and signature checked."""
    store = store or WorkflowStore()
    manifest = store.load(ref, verify=verify)
    if manifest.data.get("kind") != ARTIFACT_KIND:
        raise IntegrityError(f"{manifest.folder}: not a workflow manifest")
    text = (manifest.folder / WORKFLOW_FILE).read_text(encoding="utf-8")
    try:
        spec = load_spec_text(text, source=f"{manifest.name}:{manifest.version}")
    except WorkflowInvalid as exc:
        raise IntegrityError(
            f"{manifest.folder}: the stored workflow no longer reads: {exc.message}"
        ) from None
    return StoredWorkflow(manifest, spec)


def publish_text(
    text: str,
    source: str = "<workflow>",
    *,
    store: WorkflowStore | None = None,
    models: ModelStore | None = None,
    datasets: DatasetCheck | None = None,
) -> StoredWorkflow:
    """Check ``text`` (the YAML) against the stores and publish it as the workflow's next version.
    Nothing is published when any check fails: :class:`WorkflowInvalid` lists every problem."""
    store = store or WorkflowStore()
    models = models or ModelStore(store.home)
    if datasets is None:
        from appliance.workflows.retrieve import dataset_check

        datasets = dataset_check(models.home)
    spec, marks = parse(text, source)
    resolved, problems = check(spec, models, datasets)
    if problems:
        raise WorkflowInvalid([Problem(source, marks.line(loc), message) for loc, message in problems])
    fields = {
        "kind": ARTIFACT_KIND,
        "spec": as_dict(spec),
        "models": {step: f"{m.name}:{m.version}" for step, m in resolved.items()},
        "source": Path(source).name,
    }
    with store.staging(spec.name) as stage:
        (stage.folder / WORKFLOW_FILE).write_text(text, encoding="utf-8")
        manifest = stage.commit(fields)
    return StoredWorkflow(manifest, spec)


def publish(
    path: str | Path,
    *,
    store: WorkflowStore | None = None,
    models: ModelStore | None = None,
    datasets: DatasetCheck | None = None,
) -> StoredWorkflow:
    """:func:`publish_text` for a file; errors are located as ``path:line``."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise WorkflowInvalid([Problem(str(path), 0, f"cannot read: {exc}")]) from None
    return publish_text(text, str(path), store=store, models=models, datasets=datasets)
