"""Starting and stopping the appliance: a local Ray (the embedded default) or a joined cluster.

``appliance serve`` runs :func:`serve_forever` in the foreground; it writes
``$APPLIANCE_HOME/run/server.json`` (address, port, TLS, pid) so that the CLI client, ``status``
and ``stop`` find it, and removes it on the way out.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from appliance.config import LOCAL_RAY_ENV, OFFLINE_ENV, appliance_home, apply_offline_env, state_dir
from appliance.serve.app import APP_NAME, AppArgs, build_app

log = logging.getLogger(__name__)
RUN_FILE = "server.json"


def run_file() -> Path:
    return state_dir("run") / RUN_FILE


def read_run_file() -> dict[str, Any] | None:
    path = run_file()
    if not path.is_file():
        return None
    info: dict[str, Any] = json.loads(path.read_text())
    if not _alive(int(info.get("pid", 0))):
        return None  # a stale file from a server that died without cleaning up
    return info


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass
class Running:
    host: str
    port: int
    tls: bool
    metrics_port: int | None
    owns_ray: bool


def _init_ray(address: str | None, num_cpus: int | None) -> bool:
    import ray

    apply_offline_env()
    env = {**OFFLINE_ENV, "APPLIANCE_HOME": str(appliance_home())}
    if address:
        runtime_env = {"env_vars": env}
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=False)
        return False
    os.environ.update(LOCAL_RAY_ENV)  # inherited by the GCS, raylet and workers started below
    # This process may have imported Ray before the variable was set; Ray reads it at import.
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False
    runtime_env = {"env_vars": {**env, **LOCAL_RAY_ENV}}
    ray.init(
        num_cpus=num_cpus or os.cpu_count(),
        include_dashboard=False,
        runtime_env=runtime_env,
        log_to_driver=False,
        _node_ip_address="127.0.0.1",  # the local cluster listens on loopback only
    )
    return True


@contextmanager
def running(args: AppArgs, address: str | None = None, num_cpus: int | None = None) -> Iterator[Running]:
    """Start Ray (or join ``address``), run the Serve app, yield where it listens; tear down after."""
    import ray
    from ray import serve

    from appliance.security.pki import ensure_local_pki
    from appliance.security.tokens import ensure_local_admin_token

    home = Path(args.home) if args.home else appliance_home()
    if not args.insecure_loopback:
        ensure_local_pki(home / "pki")
    if args.auth:
        ensure_local_admin_token()
    owns_ray = _init_ray(address, num_cpus)
    try:
        serve.start(proxy_location="Disabled", http_options={"host": "127.0.0.1"})
        handle = serve.run(build_app(args.model_dump()), name=APP_NAME, route_prefix=None)
        info = handle.address.remote().result()
        yield Running(info["host"], int(info["port"]), bool(info["tls"]), info["metrics_port"], owns_ray)
    finally:
        try:
            serve.delete(APP_NAME)
            if owns_ray:
                serve.shutdown()
        finally:
            if owns_ray:
                ray.shutdown()


def wait_until_ready(timeout: float = 300.0) -> bool:
    """Poll the ingress until its models are warm."""
    from ray import serve

    handle = serve.get_app_handle(APP_NAME)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if handle.ready.remote().result():
            return True
        time.sleep(0.5)
    return False


def serve_forever(args: AppArgs, address: str | None = None) -> int:
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    with running(args, address) as live:
        ready = wait_until_ready()
        path = run_file()
        info = {
            "pid": os.getpid(),
            "host": live.host,
            "port": live.port,
            "tls": live.tls,
            "metrics_port": live.metrics_port,
            "home": str(appliance_home()),
            "models": args.models,
            "started_at": time.time(),
        }
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(info))
        tmp.replace(path)
        state = "ready" if ready else "NOT ready (models still loading; see the log)"
        print(
            f"appliance serving on {live.host}:{live.port} ({'TLS' if live.tls else 'plaintext'}), {state}",
            flush=True,
        )
        try:
            stop.wait()
        finally:
            path.unlink(missing_ok=True)
            print("appliance stopping", flush=True)
    return 0


def stop_server(timeout: float = 60.0) -> bool:
    """SIGTERM the running server and wait for it to exit; False if none was running."""
    info = read_run_file()
    if info is None:
        return False
    pid = int(info["pid"])
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    return not _alive(pid)
