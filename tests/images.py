"""Offline base images made of the host's own binaries, for the compose stack test.

No registry answers here, so compose.yaml's images (``python:3.11-slim`` for the ds01
image, ``quay.io/coreos/etcd``) are stood in for by images of the same shape, imported
from this host: the distribution's Python with ds01's runtime dependencies, and Debian's
etcd and etcdctl. The ds01 image itself is then built by compose, from the Dockerfile.
"""

from __future__ import annotations

import re
import subprocess
import tarfile
import tempfile
from collections.abc import Iterable, Iterator
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.harness import busybox_binary

PYTHON = Path("/usr/bin/python3.11")
STDLIB = Path("/usr/lib/python3.11")
SITE = "usr/local/lib/python3.11/dist-packages"  # where Debian's pip installs as root
SKIPPED_STDLIB = {"test", "idlelib", "tkinter", "turtledemo", "EXTERNALLY-MANAGED"}
BUILD_TOOLS = ("pip", "setuptools")  # what the Dockerfile's `pip install .` needs offline
# A build with no network: the dependencies are already in the image, the build backend too.
PIP_OFFLINE = ("PIP_NO_INDEX=1", "PIP_NO_BUILD_ISOLATION=0", "PIP_DISABLE_PIP_VERSION_CHECK=1")


def shared_libraries(binaries: Iterable[Path]) -> set[Path]:
    """Every shared library the binaries load, as ldd resolves them on this host."""
    found: set[Path] = set()
    for binary in binaries:
        listed = subprocess.run(["ldd", str(binary)], capture_output=True, text=True).stdout
        found.update(Path(p) for p in re.findall(r"(/\S+\.so[.\d]*) \(0x", listed))
    return found


def requirement_closure(root: str) -> list[metadata.Distribution]:
    """``root``'s installed distribution's runtime requirements, recursively (no extras)."""
    seen: dict[str, metadata.Distribution] = {}
    pending = [Requirement(root)]
    while pending:
        requirement = pending.pop()
        name = canonicalize_name(requirement.name)
        if name in seen or not (requirement.marker is None or requirement.marker.evaluate()):
            continue
        seen[name] = metadata.distribution(name)
        pending.extend(Requirement(r) for r in seen[name].requires or ())
    return [d for name, d in seen.items() if name != root]


def _distribution_files(dist: metadata.Distribution) -> Iterator[tuple[Path, str]]:
    for file in dist.files or ():
        source = Path(dist.locate_file(file))
        if source.is_file() and ".." not in file.parts:
            yield source, f"{SITE}/{file}"


def _add(tar: tarfile.TarFile, source: Path, arcname: str) -> None:
    tar.add(source, arcname=arcname, recursive=False)


def _add_tree(tar: tarfile.TarFile, root: Path, arcname: str, skip: set[str]) -> None:
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root)
        if relative.parts[0] in skip or not (path.is_file() or path.is_dir()):
            continue
        _add(tar, path, f"{arcname}/{relative}")


def _import(docker_socket: Path, archive: Path, tag: str, changes: Iterable[str]) -> str:
    argv = ["docker", "-H", f"unix://{docker_socket}", "import"]
    for change in changes:
        argv += ["--change", change]
    result = subprocess.run([*argv, str(archive), tag], capture_output=True, text=True, timeout=300)
    if result.returncode != 0:
        raise RuntimeError(f"docker import {tag}: {result.stderr.strip()}")
    return tag


def _base_tree(tar: tarfile.TarFile, binaries: Iterable[Path], loaded: Iterable[Path] = ()) -> None:
    """Directories, /bin/sh for RUN and health checks, the binaries, and the system's shared
    libraries that they and the ``loaded`` modules (added elsewhere) need."""
    for directory in ("bin", "etc", "tmp", "run", "home", "usr/local/bin", "var"):
        info = tarfile.TarInfo(directory)
        info.type, info.mode = tarfile.DIRTYPE, 0o1777 if directory == "tmp" else 0o755
        tar.addfile(info)
    link = tarfile.TarInfo("var/run")
    link.type, link.linkname = tarfile.SYMTYPE, "/run"
    tar.addfile(link)
    _add(tar, busybox_binary(), "bin/sh")
    binaries = list(binaries)
    system = {p for p in shared_libraries([*binaries, *loaded]) if "-packages/" not in str(p)}
    for path in [*binaries, *sorted(system)]:
        _add(tar, path.resolve(), str(path).lstrip("/"))


def build_python_image(docker_socket: Path, tag: str) -> str:
    """The distribution's Python 3.11 with ds01's runtime dependencies preinstalled."""
    dists = [*requirement_closure("ds01"), *(metadata.distribution(t) for t in BUILD_TOOLS)]
    files = [pair for dist in dists for pair in _distribution_files(dist)]
    extensions = [s for s, _ in files if s.suffix == ".so"]
    extensions += (STDLIB / "lib-dynload").glob("*.so")
    with tempfile.TemporaryDirectory(prefix="ds01-python-") as tmp:
        archive = Path(tmp) / "rootfs.tar"
        with tarfile.open(archive, "w") as tar:
            _base_tree(tar, [PYTHON], extensions)
            _add_tree(tar, STDLIB, str(STDLIB).lstrip("/"), SKIPPED_STDLIB)
            for source, arcname in files:
                _add(tar, source, arcname)
            for name in ("python3", "python"):
                link = tarfile.TarInfo(f"usr/bin/{name}")
                link.type, link.linkname = tarfile.SYMTYPE, PYTHON.name
                tar.addfile(link)
        return _import(docker_socket, archive, tag, [f"ENV {e}" for e in PIP_OFFLINE])


def build_etcd_image(docker_socket: Path, tag: str) -> str:
    """Debian's etcd and etcdctl, on PATH as in the etcd project's own image."""
    binaries = [Path("/usr/bin/etcd"), Path("/usr/bin/etcdctl")]
    with tempfile.TemporaryDirectory(prefix="ds01-etcd-") as tmp:
        archive = Path(tmp) / "rootfs.tar"
        with tarfile.open(archive, "w") as tar:
            _base_tree(tar, binaries)
        return _import(docker_socket, archive, tag, ["ENV ETCDCTL_API=3"])
