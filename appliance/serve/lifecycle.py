"""Starting and stopping the appliance: a local Ray (the embedded default) or a joined cluster.

``appliance serve`` runs :func:`serve_forever` in the foreground; once the Serve app is up it
writes ``$APPLIANCE_HOME/run/server.json`` (address, port, TLS, metrics port, pid, and what each
configured model still waits for) so that the CLI client, ``status`` and ``stop`` find it, and
removes it on the way out. SIGTERM or SIGINT shut it down in order, with exit status 0.
"""

from __future__ import annotations

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

from appliance.config import LOCAL_RAY_ENV, OFFLINE_ENV, appliance_home, apply_offline_env
from appliance.serve.app import APP_NAME, AppArgs, build_app
from appliance.serve.home_mirror import start_source
from appliance.serve.node import INGRESS_RESOURCE
from appliance.serve.placement import IngressPlacement, current_placement, following_nodes
from appliance.serve.runfile import run_file, write_run_file

log = logging.getLogger(__name__)


@dataclass
class Running:
    host: str
    port: int
    tls: bool
    metrics_port: int | None
    owns_ray: bool


def _init_ray(address: str | None, num_cpus: int | None, ingress: int = 1) -> bool:
    """Join ``address`` (whose nodes advertise their own ingress count), or start a local Ray
    that takes ``ingress`` ingress processes."""
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
        resources={INGRESS_RESOURCE: ingress},
        include_dashboard=False,
        runtime_env=runtime_env,
        log_to_driver=False,
        _node_ip_address="127.0.0.1",  # the local cluster listens on loopback only
    )
    return True


class DeployFailed(Exception):
    """The Serve application did not come up; the message is the replica's own error."""


def _deploy_failure() -> str | None:
    """Why the application failed, as Serve recorded it: per deployment, the replica's traceback."""
    from ray import serve

    try:
        app = serve.status().applications.get(APP_NAME)
    except Exception:  # the controller itself is gone: nothing more precise to say
        return None
    if app is None:
        return None
    messages = [f"{name}: {d.message}" for name, d in app.deployments.items() if d.message]
    return "\n".join(messages) or app.message or None


def _stop_on_signals(stop: threading.Event) -> None:
    """Let SIGTERM and SIGINT set ``stop``. Must run after ``ray.init``, which replaces the SIGTERM
    handler with ``sys.exit(15)``: that unwinds from wherever the main thread is, skips the orderly
    shutdown and ends in an abort (exit status 134) while Ray's threads are still running."""
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())


@contextmanager
def running(
    args: AppArgs,
    address: str | None = None,
    num_cpus: int | None = None,
    stop: threading.Event | None = None,
) -> Iterator[Running]:
    """Start Ray (or join ``address``), run the Serve app, yield where it listens; tear down after.

    With ``stop``, SIGTERM and SIGINT set it from the moment Ray is up (see :func:`_stop_on_signals`).
    A failed deploy raises :class:`DeployFailed` with the replica's own error."""
    import ray
    from ray import serve

    from appliance.security.pki import ensure_local_pki
    from appliance.security.tokens import ensure_local_admin_token

    home = Path(args.home) if args.home else appliance_home()
    if not args.insecure_loopback:
        ensure_local_pki(home / "pki")
    if args.auth:
        ensure_local_admin_token()
    owns_ray = _init_ray(address, num_cpus, args.ingress_count)
    # In a cluster, this node's home is the one the other nodes mirror (serve/home_mirror.py).
    source = start_source(home) if address else None
    if stop is not None:
        _stop_on_signals(stop)
    try:
        serve.start(proxy_location="Disabled", http_options={"host": "127.0.0.1"})
        try:
            placement = current_placement()
            handle = serve.run(build_app(args.model_dump(), placement), name=APP_NAME, route_prefix=None)
        except RuntimeError as exc:  # "Deploying application appliance failed": say why
            raise DeployFailed(_deploy_failure() or str(exc)) from exc
        info = handle.address.remote().result()

        def redeploy(placement: IngressPlacement) -> None:
            serve.run(build_app(args.model_dump(), placement), name=APP_NAME, route_prefix=None)

        with following_nodes(redeploy, placement, enabled=address is not None):  # nodes join and leave
            yield Running(info["host"], int(info["port"]), bool(info["tls"]), info["metrics_port"], owns_ray)
    finally:
        try:
            serve.delete(APP_NAME)
            if owns_ray:
                serve.shutdown()
        finally:
            if source is not None:
                ray.kill(source)
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


def _report_waiting(waiting: dict[str, str]) -> None:
    if not waiting:
        print("appliance ready: every configured model is serving", flush=True)
    for ref, reason in waiting.items():
        print(f"appliance NOT ready: waiting for model {ref!r}: {reason}", flush=True)


def _watch_models(info: dict[str, Any], stop: threading.Event) -> None:
    """Until ``stop``: ask the ingress what its configured models wait for; print each change and
    keep it in the run file, where ``appliance status`` reads it."""
    from ray import serve

    handle = serve.get_app_handle(APP_NAME)
    last: dict[str, str] | None = None
    while not stop.is_set():
        try:
            waiting: dict[str, str] = handle.waiting.remote().result(timeout_s=30)
        except Exception as exc:  # a replica being replaced: ask again
            log.warning("could not ask the ingress about its models: %s", exc)
        else:
            if waiting != last:
                _report_waiting(waiting)
                info["waiting"] = waiting
                write_run_file(info)
                last = waiting
        stop.wait(5.0 if last == {} else 1.0)  # each ask costs a handle call: slower once all serve


def serve_forever(args: AppArgs, address: str | None = None) -> int:
    """Serve until SIGTERM or SIGINT, then shut down in order; returns the exit status."""
    stop = threading.Event()
    with running(args, address, stop=stop) as live:
        info = {
            "pid": os.getpid(),
            "host": live.host,
            "port": live.port,
            "tls": live.tls,
            "metrics_port": live.metrics_port,
            "home": str(appliance_home()),
            "models": args.models,
            "waiting": {model: "loading" for model in args.models},
            "started_at": time.time(),
        }
        write_run_file(info)  # at once: `status` and `stop` work while the models load
        metrics = f", metrics on 127.0.0.1:{live.metrics_port}" if live.metrics_port is not None else ""
        print(
            f"appliance serving on {live.host}:{live.port} ({'TLS' if live.tls else 'plaintext'}){metrics}",
            flush=True,
        )
        try:
            _watch_models(info, stop)
        finally:
            run_file().unlink(missing_ok=True)
            print("appliance stopping", flush=True)
    return 0
