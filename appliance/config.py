"""Process-wide settings: where the appliance keeps its state, and the offline environment.

Every entry point calls :func:`apply_offline_env` before importing Ray, vLLM or Hugging Face
libraries, so that no process the appliance starts reports usage or reaches for a model hub.
"""

from __future__ import annotations

import os
from pathlib import Path

from appliance.files import make_private_dir

# Usage statistics and hub access off, for this process and every child it starts.
OFFLINE_ENV: dict[str, str] = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "VLLM_NO_USAGE_STATS": "1",
    "VLLM_DO_NOT_TRACK": "1",
    "DO_NOT_TRACK": "1",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "RAY_DASHBOARD_ENABLED": "0",
    # vLLM finds its own address by "connecting" a UDP socket to 8.8.8.8 unless told; an engine
    # (one GPU or one tensor-parallel group) never spans boxes here, so loopback is its address.
    "VLLM_HOST_IP": "127.0.0.1",
}


# The embedded default (a single-box Ray) runs with these too:
# - Ray resolves its node address to loopback without probing the network (on Linux it otherwise
#   "connects" a UDP socket to 8.8.8.8:53 to find its outbound interface, then binds and dials the
#   box's external address). Ray reads this at import, so it is set before Ray starts.
# - Outbound HTTP from any library is sent to a closed port on loopback, and only loopback is
#   reached directly. Ray 2.60's usage-stats module probes cloud metadata endpoints
#   (169.254.169.254) before it checks that usage stats are off; with this it never leaves the box.
_DEAD_PROXY = "http://127.0.0.1:9"
_LOOPBACK = "127.0.0.1,localhost,::1"
LOCAL_RAY_ENV: dict[str, str] = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "HTTP_PROXY": _DEAD_PROXY,
    "HTTPS_PROXY": _DEAD_PROXY,
    "http_proxy": _DEAD_PROXY,
    "https_proxy": _DEAD_PROXY,
    "NO_PROXY": _LOOPBACK,
    "no_proxy": _LOOPBACK,
}


def apply_offline_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """Force the no-telemetry / offline variables into ``env`` (default: ``os.environ``)."""
    target: dict[str, str] = os.environ if env is None else env  # type: ignore[assignment]
    target.update(OFFLINE_ENV)
    return target


def appliance_home() -> Path:
    """The root of all appliance state: ``$APPLIANCE_HOME``, else a per-user data directory."""
    explicit = os.environ.get("APPLIANCE_HOME")
    if explicit:
        return Path(explicit).expanduser().resolve()
    xdg = os.environ.get("XDG_DATA_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".local" / "share"
    return (base / "appliance").resolve()


def models_dir() -> Path:
    return appliance_home() / "models"


def encoders_dir() -> Path:
    """Shared encoder artifacts, stored once and referenced by content hash."""
    return appliance_home() / "encoders"


def state_dir(name: str) -> Path:
    """A named sub-folder of the appliance home (``pki``, ``tokens``, ``audit``, ``run``, ...)."""
    path = appliance_home() / name
    make_private_dir(path)  # 0700 whatever the umask (0750 where the home is shared with a group)
    return path
