"""A real Ray Serve appliance over a small real specialist, shared by the serving tests."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from specialists import train_subset

from appliance.client import Connection
from appliance.config import OFFLINE_ENV
from appliance.store import ModelStore
from tests.helpers.serving import MODEL, App


@pytest.fixture(scope="session")
def home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """An APPLIANCE_HOME with the b8 specialist published, the local PKI and an admin token."""
    from appliance.security.pki import ensure_local_pki
    from appliance.security.tokens import ensure_local_admin_token

    path = tmp_path_factory.mktemp("serving-home")
    previous = os.environ.get("APPLIANCE_HOME")
    os.environ["APPLIANCE_HOME"] = str(path)
    train_subset(ModelStore(path), MODEL, path / "work")
    ensure_local_pki(path / "pki")
    ensure_local_admin_token()
    yield path
    if previous is not None:
        os.environ["APPLIANCE_HOME"] = previous


@pytest.fixture(scope="module")
def ray_cluster(home: Path) -> Iterator[None]:
    import ray
    from ray import serve

    ray.init(
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        _node_ip_address="127.0.0.1",
        runtime_env={"env_vars": {**OFFLINE_ENV, "APPLIANCE_HOME": str(home)}},
    )
    serve.start(proxy_location="Disabled")
    yield
    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="module")
def start_app(ray_cluster: None, home: Path) -> Iterator[Callable[..., App]]:
    """Run a named Serve app of the appliance; returns where it listens."""
    from ray import serve

    from appliance.serve.app import build_app

    started: list[str] = []

    def start(name: str, **overrides: Any) -> App:
        args = {
            "host": "127.0.0.1",
            "port": 0,
            "home": str(home),
            "models": [MODEL],
            "open_reflection": True,
            "metrics_port": 0,
            "ingress_cpus": 0.25,
            **overrides,
        }
        handle = serve.run(build_app(args), name=name, route_prefix=None)
        started.append(name)
        info = handle.address.remote().result()
        token = (home / "client" / "token").read_text().strip()
        conn = Connection(f"127.0.0.1:{info['port']}", tls=True, ca=home / "pki" / "ca.crt", token=token)
        return App(name, int(info["port"]), home, conn, info["metrics_port"])

    yield start
    for name in started:
        serve.delete(name)


@pytest.fixture(scope="module")
def app(start_app: Callable[..., App]) -> App:
    return start_app("main")
