"""Raw HTTP on the gateway socket, as a hostile local user sends it: no docker CLI, no
library, just bytes, run as a real Unix user (runuser) with the system Python."""

from __future__ import annotations

import asyncio
import json
import subprocess
from dataclasses import dataclass
from typing import Any

# Runs with /usr/bin/python3 and the standard library only, as the user.
_CLIENT = r"""
import json, socket, sys
path, connections = sys.argv[1], json.loads(sys.stdin.read())
out = []
for raw in connections:
    s = socket.socket(socket.AF_UNIX); s.settimeout(20); s.connect(path)
    try:
        s.sendall(raw.encode("latin-1"))
    except (BrokenPipeError, ConnectionResetError):
        pass  # refused before it was all sent: the answer is still there to read
    f = s.makefile("rb")
    answers = []
    try:
        while True:
            line = f.readline()
            if not line:
                break
            status = int(line.split(b" ", 2)[1])
            headers = {}
            while (h := f.readline()) not in (b"\r\n", b"\n", b""):
                k, _, v = h.decode("latin-1").partition(":")
                headers[k.strip().lower()] = v.strip()
            if status == 101:
                answers.append([status, ""]); break
            if "content-length" in headers:
                body = f.read(int(headers["content-length"]))
            elif headers.get("transfer-encoding") == "chunked":
                body = b""
                while (size := int(f.readline().strip() or b"0", 16)):
                    body += f.read(size); f.readline()
                f.readline()
            else:
                body = f.read()
            answers.append([status, body.decode("utf-8", "replace")])
    except (socket.timeout, OSError, ValueError) as err:
        answers.append([0, f"client: {err!r}"])
    s.close()
    out.append(answers)
print(json.dumps(out))
"""


@dataclass(frozen=True)
class Answer:
    status: int
    body: str

    def json(self) -> Any:
        return json.loads(self.body) if self.body.strip() else None


async def raw_as(user: str, socket: str, connections: list[str]) -> list[list[Answer]]:
    """Each string is sent on a connection of its own; every answer read back, in order."""
    argv = ["runuser", "-u", user, "--", "/usr/bin/python3", "-c", _CLIENT, socket]
    result = await asyncio.to_thread(
        subprocess.run,
        argv,
        input=json.dumps(connections),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    return [[Answer(s, b) for s, b in answers] for answers in json.loads(result.stdout)]


def request(
    method: str,
    target: str,
    body: Any = None,
    *,
    raw_body: bytes | str | None = None,
    headers: dict[str, str] | None = None,
    close: bool = True,
) -> str:
    """One HTTP/1.1 request as text (latin-1 for bytes); JSON unless ``raw_body``."""
    if raw_body is None and body is not None:
        raw_body = json.dumps(body)
    if isinstance(raw_body, str):
        raw_body = raw_body.encode("utf-8")
    data = (raw_body or b"").decode("latin-1")  # carries the bytes as they are
    head = {"Host": "docker"}
    if body is not None:
        head["Content-Type"] = "application/json"
    head.update(headers or {})
    if data or method in ("POST", "PUT"):
        head["Content-Length"] = str(len(data.encode("latin-1")))
    if close:
        head["Connection"] = "close"
    lines = "".join(f"{k}: {v}\r\n" for k, v in head.items())
    return f"{method} {target} HTTP/1.1\r\n{lines}\r\n{data}"
