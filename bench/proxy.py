"""The Docker gateway against the real daemon's socket, measured in one run and printed as
ratios: `docker ps` and inspect latency, log and exec (hijacked) stream throughput, and
what a create costs on top of Docker's own create.

The client speaks plain HTTP over the Unix socket (what the docker CLI sends, without the
CLI's own start-up time). Through the gateway it runs as the unprivileged user `nobody`,
so every request takes the full admission chain: the kernel names the caller, references
are resolved by the daemon, bodies decoded and re-encoded, lists filtered, Docker's view
checked after a create. Directly it runs as root, as the daemon needs.

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
from _suite import REPO, compare_metrics, scraping, suite

sys.path.insert(0, str(REPO))
from tests.harness import build_test_image

LIMITS = "defaults:\n  max_cpus: 1\n  priority: 10\n"
STREAM_BYTES = 64 * 1024 * 1024

# Runs with /usr/bin/python3 and the standard library only, as root or as nobody.
CLIENT = r"""
import json, socket, statistics, sys, time
path, container, image, count = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
size = int(sys.argv[5])

def call(method, target, body=None, upgrade=False):
    s = socket.socket(socket.AF_UNIX); s.connect(path)
    head = f"{method} {target} HTTP/1.1\r\nHost: docker\r\nConnection: close\r\n"
    if upgrade:
        head = head.replace("Connection: close", "Connection: Upgrade\r\nUpgrade: tcp")
    data = json.dumps(body).encode() if body is not None else b""
    if body is not None:
        head += f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n"
    s.sendall(head.encode() + b"\r\n" + data)
    chunks = []
    while chunk := s.recv(1 << 20):
        chunks.append(chunk)
    s.close()
    return b"".join(chunks)

def median(fn):
    samples = []
    for _ in range(count):
        start = time.perf_counter(); fn(); samples.append(time.perf_counter() - start)
    return statistics.median(samples)

result = {
    "ps": median(lambda: call("GET", "/v1.41/containers/json?all=1")),
    "inspect": median(lambda: call("GET", f"/v1.41/containers/{container}/json")),
}
start = time.perf_counter()
got = len(call("GET", f"/v1.41/containers/{container}/logs?stdout=1"))
result["logs"] = got / (time.perf_counter() - start)
made = call("POST", f"/v1.41/containers/{container}/exec",
            {"Cmd": ["head", "-c", str(size), "/dev/zero"], "AttachStdout": True})
exec_id = json.loads(made.rsplit(b"\r\n\r\n", 1)[1])["Id"]
start = time.perf_counter()
got = len(call("POST", f"/v1.41/exec/{exec_id}/start", {"Detach": False, "Tty": True},
               upgrade=True))
result["exec_stream"] = got / (time.perf_counter() - start)

creates = []
for i in range(max(count // 10, 5)):
    body = {"Image": image, "Cmd": ["true"], "HostConfig": {"NetworkMode": "none"}}
    start = time.perf_counter()
    answer = call("POST", f"/v1.41/containers/create?name=bench{i}", body)
    creates.append(time.perf_counter() - start)
    cid = json.loads(answer.rsplit(b"\r\n\r\n", 1)[1])["Id"]
    call("DELETE", f"/v1.41/containers/{cid}?force=1")
result["create"] = statistics.median(creates)
print(json.dumps(result))
"""


def measure(socket_path: str, container: str, image: str, count: int, user: str | None) -> dict:
    argv = ["/usr/bin/python3", "-c", CLIENT, socket_path, container, image, str(count)]
    argv.append(str(STREAM_BYTES))
    if user:
        argv = ["runuser", "-u", user, "--", *argv]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=900)
    if out.returncode != 0:
        raise SystemExit(out.stderr)
    return json.loads(out.stdout)


# The floor of any relay written in Python on this machine: accept, connect upstream,
# copy bytes both ways, no parsing and no policy. Measured in the same run.
BARE_RELAY = r"""
import asyncio, os, sys
upstream, listen = sys.argv[1], sys.argv[2]
async def serve(reader, writer):
    up_reader, up_writer = await asyncio.open_unix_connection(upstream)
    async def pipe(source, sink):
        while data := await source.read(65536):
            sink.write(data); await sink.drain()
        if sink.can_write_eof(): sink.write_eof()
    await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
    writer.close(); up_writer.close()
async def main():
    await asyncio.start_unix_server(serve, path=listen)
    os.chmod(listen, 0o666)
    print("ready", flush=True)
    await asyncio.Event().wait()
asyncio.run(main())
"""


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
    parser.add_argument(
        "--metrics", choices=["compare", "on", "off"], default="compare",
        help="compare: alternate runs without metrics and with /metrics scraped every second",
    )  # fmt: skip
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the comparison")
    args = parser.parse_args()
    compare_metrics(lambda metrics: run(args, metrics), args.metrics, args.rounds)


def run(args: argparse.Namespace, metrics: bool) -> dict[str, float]:
    """One measurement on a fresh suite; the gateway's ratios to the direct socket."""
    with (
        suite("limits,ownership", LIMITS, etcd=True, docker=True, metrics=metrics) as running,
        scraping(running),
    ):
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
                ["sh", "-c", f"head -c {STREAM_BYTES} /dev/zero | tr '\\0' x; sleep 3600"],
                name="talker",
                labels={"ds01.user": "nobody"},
                network_mode="none",
                detach=True,
            )
            time.sleep(3)  # the log is written and ownership recorded
            proxy = str(running.root / "run" / "docker.sock")
            direct_socket = str(running.docker_socket)
            cli_direct = cli_ps(direct_socket, 20)
            cli_proxy = cli_ps(proxy, 20)
            direct = measure(direct_socket, "talker", image, args.requests, None)
            through = measure(proxy, "talker", image, args.requests, "nobody")
            as_admin = measure(proxy, "talker", image, args.requests, None)
            bare_socket = str(running.root / "bare.sock")
            bare = subprocess.Popen(
                [sys.executable, "-c", BARE_RELAY, direct_socket, bare_socket],
                stdout=subprocess.PIPE,
                text=True,
            )
            try:
                assert bare.stdout is not None and bare.stdout.readline().strip() == "ready"
                floor = measure(bare_socket, "talker", image, args.requests, None)
            finally:
                bare.terminate()
                bare.wait()
            talker.remove(force=True)
        finally:
            client.close()
    print(f"{args.requests} requests each; 21 containers, 6 of them nobody's:")
    for key, label, target in (
        ("ps", "docker ps (GET /containers/json)", "<= 1.15x"),
        ("inspect", "docker inspect (GET /containers/ID/json)", "<= 2x"),
    ):
        print(
            f"  {label:<42} direct {direct[key] * 1e3:6.2f} ms   gateway (user) "
            f"{through[key] * 1e3:6.2f} ms = {through[key] / direct[key]:.2f}x   "
            f"gateway (root) {as_admin[key] / direct[key]:.2f}x   bare Python relay "
            f"{floor[key] / direct[key]:.2f}x   (target {target})"
        )
    print(
        f"  the docker CLI itself, `docker ps -a`: direct {cli_direct * 1e3:.1f} ms, "
        f"gateway {cli_proxy * 1e3:.1f} ms = {cli_proxy / cli_direct:.2f}x"
    )
    for key, label in (("logs", "docker logs"), ("exec_stream", "exec -t (hijacked)")):
        ratio = through[key] / direct[key]
        print(
            f"  {label}, {STREAM_BYTES >> 20} MiB: direct {direct[key] / 1e6:.0f} MB/s, "
            f"gateway {through[key] / 1e6:.0f} MB/s = {ratio:.0%} (target >= 80%)"
        )
    extra = through["create"] - direct["create"]
    print(
        f"  create: direct {direct['create'] * 1e3:.1f} ms, gateway {through['create'] * 1e3:.1f}"
        f" ms: +{extra * 1e3:.1f} ms = {extra / direct['inspect']:.1f} direct inspects "
        "(target: about one)"
    )

    return {
        "docker ps through the gateway / direct": through["ps"] / direct["ps"],
        "docker inspect through the gateway / direct": through["inspect"] / direct["inspect"],
    }


if __name__ == "__main__":
    main()
