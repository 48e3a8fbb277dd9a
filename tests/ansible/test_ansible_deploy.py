"""deploy/ and the roles' interfaces: manifests parse and say what they must, one source of truth."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from install_harness import ANSIBLE_DIR, REPO, VENV_BIN

from appliance.config import OFFLINE_ENV

DEPLOY = REPO / "deploy"
SERVE_CONFIG = DEPLOY / "serve" / "appliance.yaml"
ROLES = ANSIBLE_DIR / "roles"


def _rayservice() -> dict[str, Any]:
    docs = list(yaml.safe_load_all((DEPLOY / "kuberay" / "rayservice.yaml").read_text()))
    services = [doc for doc in docs if doc and doc.get("kind") == "RayService"]
    assert len(services) == 1
    return services[0]


def _containers(ray_service: dict[str, Any]) -> list[dict[str, Any]]:
    cluster = ray_service["spec"]["rayClusterConfig"]
    pods = [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]
    return [container for pod in pods for container in pod["spec"]["containers"]]


def test_rayservice_manifest_has_the_required_fields() -> None:
    service = _rayservice()
    assert service["apiVersion"] == "ray.io/v1"
    serve = yaml.safe_load(service["spec"]["serveConfigV2"])
    [app] = serve["applications"]
    assert app["name"] == "appliance"
    assert app["import_path"] == "appliance.serve.app:build_app"
    cluster = service["spec"]["rayClusterConfig"]
    head_params = cluster["headGroupSpec"]["rayStartParams"]
    assert head_params["dashboard-host"] == "127.0.0.1"  # the dashboard never leaves loopback
    assert cluster["workerGroupSpecs"], "a worker group is required"
    for container in _containers(service):
        env = {item["name"]: item["value"] for item in container["env"]}
        assert {key: env.get(key) for key in OFFLINE_ENV} == OFFLINE_ENV, container["name"]
        assert container["image"]


def test_rayservice_runs_the_same_serve_config() -> None:
    in_manifest = yaml.safe_load(_rayservice()["spec"]["serveConfigV2"])
    assert in_manifest == yaml.safe_load(SERVE_CONFIG.read_text()), (
        "serveConfigV2 in deploy/kuberay/rayservice.yaml differs from deploy/serve/appliance.yaml; "
        "paste the Serve config into serveConfigV2"
    )


@pytest.mark.parametrize("source", ["deploy/serve/appliance.yaml", "deploy/kuberay/rayservice.yaml"])
def test_serve_config_loads_with_rays_schema(source: str) -> None:
    from ray.serve import schema

    if source.endswith("appliance.yaml"):
        config = yaml.safe_load(SERVE_CONFIG.read_text())
    else:
        config = yaml.safe_load(_rayservice()["spec"]["serveConfigV2"])
    parsed = schema.ServeDeploySchema.model_validate(config)
    assert [app.name for app in parsed.applications] == ["appliance"]


def test_prometheus_scrapes_the_appliance_and_ray() -> None:
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert set(jobs) >= {"appliance", "ray"}
    for name, port in [("appliance", 9464), ("ray", 8080)]:
        targets = [t for group in jobs[name]["static_configs"] for t in group["targets"]]
        assert targets and all(t.rsplit(":", 1)[1] == str(port) for t in targets), (name, targets)
        assert jobs[name].get("metrics_path", "/metrics") == "/metrics"


def test_role_unit_templates_are_the_deploy_templates() -> None:
    """One source of truth: each role's unit template is a link to deploy/systemd."""
    links = sorted(ROLES.glob("*/templates/*.service.j2"))
    assert {p.name for p in links} == {p.name for p in (DEPLOY / "systemd").glob("*.service.j2")}
    for link in links:
        assert link.is_symlink() and link.resolve().parent == (DEPLOY / "systemd").resolve(), link


@pytest.mark.parametrize("unit", sorted(p.name for p in (DEPLOY / "systemd").glob("*.service.j2")))
def test_unit_templates_have_restart_policy_and_limits(unit: str) -> None:
    text = (DEPLOY / "systemd" / unit).read_text()
    if "Type=oneshot" in text:  # the perimeter loads a ruleset and exits
        assert "RemainAfterExit=yes" in text
        return
    for line in ("Restart=on-failure", "LimitNOFILE={{", "MemoryMax={{", "EnvironmentFile={{"):
        assert line in text, f"{unit} lacks {line}"


def test_role_defaults_are_prefixed_and_offline_env_matches_the_package() -> None:
    for defaults in ROLES.glob("*/defaults/main.yml"):
        role = defaults.parent.parent.name
        for name in yaml.safe_load(defaults.read_text()):
            assert name.startswith(f"{role}_"), f"{role}: {name} is not prefixed with the role name"
    common = yaml.safe_load((ROLES / "appliance_common" / "defaults" / "main.yml").read_text())
    assert common["appliance_common_offline_env"] == OFFLINE_ENV


@pytest.mark.slow
def test_ansible_lint_is_clean() -> None:
    lint = VENV_BIN / "ansible-lint"
    if not lint.exists():
        pytest.skip(f"ansible-lint is not installed in {VENV_BIN} (it is in the dev extras)")
    env = {**os.environ, "PATH": f"{VENV_BIN}:{os.environ.get('PATH', '')}", "NO_COLOR": "1"}
    proc = subprocess.run([str(lint)], cwd=ANSIBLE_DIR, env=env, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_playbook_syntax() -> None:
    playbook = VENV_BIN / "ansible-playbook"
    if not playbook.exists():
        pytest.skip(f"ansible-core is not installed in {VENV_BIN}")
    example = Path("inventory") / "example.ini"
    proc = subprocess.run(
        [str(playbook), "--syntax-check", "-i", str(example), "site.yml"],
        cwd=ANSIBLE_DIR,
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
