"""The full-profile install, end to end: too slow for CI, run by hand before a release.

    sudo .venv/bin/python bench/install/full_profile.py [--profile cpu] [--keep]

Builds the real wheelhouse (`appliance bundle --profile cpu`, about 3.5 GB installed), installs it
with the playbook onto a fresh Debian chroot whose commands have no network, with everything the CI
run switches off turned on: the CA and server certificate from `appliance pki`, the admin token,
the Serve config. Then runs the playbook again and checks that nothing changed, and imports the
heavy stack inside the target. Timings and counts go to bench/results/install-<profile>.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "ansible"))
sys.path.insert(0, str(REPO))  # the harness imports tests.helpers

from install_harness import build_rootfs, chroot_vars, require_root_tools, run_playbook, write_inventory  # noqa: E402

from appliance.security import release  # noqa: E402

_ENGINES = "import torch, vllm, transformers, onnxruntime, ray, appliance.cli; print(torch.__version__)"
T = TypeVar("T")
IMPORTS = {
    "cpu": _ENGINES,
    "gpu": _ENGINES,
    "core": "import transformers, ray, appliance.cli; print(ray.__version__)",
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", choices=sorted(IMPORTS), default="cpu")
    parser.add_argument("--work", type=Path, help="work folder (default: a temporary one)")
    parser.add_argument("--keep", action="store_true", help="keep the bundle and the target afterwards")
    parser.add_argument("--bundle", type=Path, help="install this existing bundle instead of building one")
    parser.add_argument(
        "--release-key", type=Path, help="the release key that signs (or signed --bundle); default: a new one"
    )
    args = parser.parse_args()
    require_root_tools()
    work = args.work or Path(tempfile.mkdtemp(prefix="appliance-full-install-"))
    work.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}

    def timed(name: str, fn: Callable[..., T], *a: Any, **kw: Any) -> T:
        start = time.perf_counter()
        result = fn(*a, **kw)
        timings[name] = round(time.perf_counter() - start, 1)
        print(f"{name}: {timings[name]} s", flush=True)
        return result

    release_key = args.release_key or work / "release.key"
    if not release_key.exists():
        release.init_key(release_key)
    bundle = args.bundle or work / f"bundle-{args.profile}"
    if not args.bundle:
        command = ["-m", "appliance.bundle", "--profile", args.profile, "--out", str(bundle), "--force"]
        command += ["--release-key", str(release_key)]
        timed("bundle", subprocess.run, [sys.executable, *command], check=True, cwd=REPO)
    rootfs = timed("debootstrap (or cache)", build_rootfs)
    target = work / "target"
    shutil.rmtree(target, ignore_errors=True)
    subprocess.run(["cp", "-a", str(rootfs), str(target)], check=True)

    serve_config = str(REPO / "deploy" / "serve" / "appliance.yaml")
    variables = chroot_vars(bundle, serve_config, release_key=release_key)
    variables.update(
        appliance_profile=args.profile,
        appliance_server_pki_manage="true",
        appliance_server_admin_token="true",
        appliance_common_audit_seal_manage="true",
    )
    inventory = write_inventory(
        work / "inventory.ini",
        heads={"head": {"ansible_host": str(target), "appliance_address": "192.0.2.10"}},
        workers={},
        **variables,
    )
    first = timed("converge", run_playbook, inventory)
    (work / "converge.log").write_text(first.output)
    if first.returncode != 0:
        print(first.output[-6000:], file=sys.stderr)
        return 1
    second = timed("second run", run_playbook, inventory)
    (work / "second.log").write_text(second.output)
    imports = subprocess.run(
        ["chroot", str(target), "/opt/appliance/venv/bin/python", "-c", IMPORTS[args.profile]],
        capture_output=True,
        text=True,
        check=False,
        env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"},
    )
    units = sorted(
        f"/etc/systemd/system/{p.name}" for p in (target / "etc/systemd/system").glob("appliance-*.service")
    )
    verify = subprocess.run(
        ["systemd-analyze", "verify", f"--root={target}", *units], capture_output=True, text=True, check=False
    )
    home = target / "var" / "lib" / "appliance"
    result = {
        "profile": args.profile,
        "timings_s": timings,
        "bundle": json.loads((bundle / "bundle.json").read_text()),
        "bundle_bytes": sum(p.stat().st_size for p in (bundle / "wheels").iterdir()),
        "venv_bytes": sum(
            p.stat().st_size for p in (target / "opt/appliance/venv").rglob("*") if p.is_file()
        ),
        "converge_recap": first.recap(),
        "second_run_recap": second.recap(),
        "imports": imports.stdout.strip() or imports.stderr.strip()[-2000:],
        "pki_files": sorted(p.name for p in (home / "pki").iterdir()),
        "admin_token_present": (target / "etc/appliance/admin.token").is_file(),
        "units_verified": verify.returncode == 0 and not verify.stderr.strip(),
    }
    out = REPO / "bench" / "results" / f"install-{args.profile}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    if not args.keep:
        shutil.rmtree(target, ignore_errors=True)
        if not args.bundle:
            shutil.rmtree(bundle, ignore_errors=True)
    second_changed = sum(host["changed"] for host in second.recap().values())
    ok = (
        imports.returncode == 0
        and second.returncode == 0
        and second_changed == 0
        and result["units_verified"]
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
