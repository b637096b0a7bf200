"""Each ds01 container's /etc/passwd and /etc/group, kept on the host.

Written by the containers service at create (and again at start if they have gone),
bind-mounted read-only into the container, removed with it; the Docker gateway lets a
start through with them, as the container's own.
"""

from __future__ import annotations

import contextlib
from pathlib import Path


class AccountFiles:
    """The /etc/passwd and /etc/group of each container ds01 makes, in a directory of the
    host named after it, bind-mounted read-only over the image's (as Docker mounts its
    /etc/hosts): the user's names without writing into the container, which cost dockerd
    a helper process and a mount of the container's filesystem at every create."""

    TARGETS = ("/etc/passwd", "/etc/group")

    def __init__(self, root: Path) -> None:
        self.root = root

    def paths(self, docker_name: str) -> tuple[Path, Path]:
        if "/" in docker_name or docker_name.startswith("."):  # never a path of its own
            raise ValueError(f"{docker_name!r} is no container name")
        directory = self.root / docker_name
        return directory / "passwd", directory / "group"

    def sources(self, docker_name: str) -> list[str]:
        """Where the container's files are, as Docker's Mounts name them."""
        return [str(path) for path in self.paths(docker_name)]

    def binds(self, docker_name: str) -> list[str]:
        """The container's read-only bind mounts of its files, as Docker's Binds say."""
        sources = self.paths(docker_name)
        return [
            f"{source}:{target}:ro" for source, target in zip(sources, self.TARGETS, strict=True)
        ]

    def write(self, docker_name: str, passwd: str, group: str) -> None:
        """Write (or write again) the container's files: root's, readable by all, each
        replaced whole (a start never mounts half a file)."""
        for path, text in zip(self.paths(docker_name), (passwd, group), strict=True):
            path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
            if path.is_dir() and not path.is_symlink():
                path.rmdir()  # what dockerd makes where a bind's source is missing: empty
            partial = path.with_name(f".{path.name}.partial")
            partial.write_text(text)
            partial.chmod(0o644)
            partial.replace(path)

    def missing(self, docker_name: str) -> bool:
        return not all(path.is_file() for path in self.paths(docker_name))

    def remove(self, docker_name: str) -> None:
        directory = self.paths(docker_name)[0].parent
        for path in directory.glob("*") if directory.is_dir() else ():
            path.unlink(missing_ok=True)
        with contextlib.suppress(FileNotFoundError):
            directory.rmdir()
