"""`docker ps` / `inspect` latency and `docker logs` throughput through the filtering
proxy, against the real daemon's socket, measured in this run and printed as ratios.

The client speaks plain HTTP over the Unix socket (what the docker CLI sends, without
the CLI's own start-up time). Through the proxy it runs as the unprivileged user
`nobody`, so every request takes the full path: the kernel names the caller, the
owner is looked up, lists are filtered. Directly it runs as root, as the daemon needs.

    .venv/bin/python bench/proxy.py [--requests 300]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import docker
from _suite import REPO, suite

sys.path.insert(0, str(REPO))
from tests.harness import build_test_image

LIMITS = "defaults:\n  max_cpus: 1\n  priority: 10\n"
LOG_BYTES = 64 * 1024 * 1024

# Runs with /usr/bin/python3 and the standard library only, as root or as nobody.
CLIENT = r"""
import json, socket, statistics, sys, time
path, container, count = sys.argv[1], sys.argv[2], int(sys.argv[3])

def get(target, sink=None):
    s = socket.socket(socket.AF_UNIX); s.connect(path)
    s.sendall(f"GET {target} HTTP/1.1\r\nHost: docker\r\nConnection: close\r\n\r\n".encode())
    total = 0
    while chunk := s.recv(1 << 20):
        total += len(chunk)
    s.close()
    return total

result = {}
for name, target in (("ps", "/v1.41/containers/json?all=1"),
                     ("inspect", f"/v1.41/containers/{container}/json")):
    samples = []
    for _ in range(count):
        start = time.perf_counter(); get(target); samples.append(time.perf_counter() - start)
    result[name] = statistics.median(samples)
start = time.perf_counter()
size = get(f"/v1.41/containers/{container}/logs?stdout=1")
result["logs_bytes_per_s"] = size / (time.perf_counter() - start)
print(json.dumps(result))
"""


def measure(socket_path: str, container: str, count: int, user: str | None) -> dict:
    argv = ["/usr/bin/python3", "-c", CLIENT, socket_path, container, str(count)]
    if user:
        argv = ["runuser", "-u", user, "--", *argv]
    out = subprocess.run(argv, capture_output=True, text=True, check=True, timeout=600)
    return json.loads(out.stdout)


def cli_ps(socket_path: str, runs: int) -> float:
    """The median time of the real `docker ps -a` (CLI start-up included), as root."""
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(
            ["docker", "-H", f"unix://{socket_path}", "ps", "-a"], capture_output=True, check=True
        )
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=300)
    args = parser.parse_args()
    with suite("limits,ownership", LIMITS, etcd=True, docker=True) as running:
        assert running.docker_socket is not None
        image = build_test_image(running.docker_socket)
        client = docker.DockerClient(base_url=f"unix://{running.docker_socket}")
        try:
            for i in range(20):  # a list worth filtering: most are someone else's
                owner = "nobody" if i % 4 == 0 else f"user{i}"
                client.containers.create(
                    image, "true", name=f"c{i}", labels={"ds01.user": owner}, network_mode="none"
                )
            talker = client.containers.run(
                image,
                ["sh", "-c", f"head -c {LOG_BYTES} /dev/zero | tr '\\0' x"],
                name="talker",
                labels={"ds01.user": "nobody"},
                network_mode="none",
                detach=True,
            )
            talker.wait()
            time.sleep(1)  # ownership of the new containers is recorded
            proxy = str(running.root / "run" / "docker.sock")
            cli_direct = cli_ps(str(running.docker_socket), 20)
            cli_proxy = cli_ps(str(running.root / "run" / "docker.sock"), 20)
            direct = measure(str(running.docker_socket), "talker", args.requests, None)
            through = measure(proxy, "talker", args.requests, "nobody")
            as_admin = measure(proxy, "talker", args.requests, None)
        finally:
            client.close()
    print(f"{args.requests} requests each; 21 containers, 6 of them nobody's:")
    for key, label in (
        ("ps", "docker ps (GET /containers/json)"),
        ("inspect", "docker inspect (GET /containers/ID/json)"),
    ):
        print(
            f"  {label:<42} direct {direct[key] * 1e3:6.2f} ms   proxy (user) "
            f"{through[key] * 1e3:6.2f} ms = {through[key] / direct[key]:.2f}x   "
            f"proxy (root) {as_admin[key] / direct[key]:.2f}x   (target <= 1.15x)"
        )
    print(
        f"  the docker CLI itself, `docker ps -a`: direct {cli_direct * 1e3:.1f} ms, "
        f"proxy {cli_proxy * 1e3:.1f} ms = {cli_proxy / cli_direct:.2f}x"
    )
    ratio = through["logs_bytes_per_s"] / direct["logs_bytes_per_s"]
    print(
        f"  docker logs, {LOG_BYTES >> 20} MiB: direct {direct['logs_bytes_per_s'] / 1e6:.0f} MB/s,"
        f" proxy {through['logs_bytes_per_s'] / 1e6:.0f} MB/s = {ratio:.0%} (target >= 80%)"
    )


if __name__ == "__main__":
    main()
