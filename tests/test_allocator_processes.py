"""Several allocator processes on one etcd: races, and a lock holder killed with -9."""

from __future__ import annotations

import asyncio
import collections
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import yaml

from ds01.client import ClientIdentity, Ds01Client, Ds01Error
from ds01.core.config import load_config
from ds01.core.pki import Pki
from ds01.core.processes import free_port
from tests.allocator_env import AllocatorEnv, wipe

REPO = Path(__file__).resolve().parent.parent
DS01D = str(REPO / ".venv" / "bin" / "ds01d")

# Eight 1g.10gb slices on two GPUs; a student may hold 0.3 GPU-equivalents (two slices).
RACE_LIMITS = "defaults:\n  max_gpu_equivalents: 0.3\n  max_gpu_slots_per_container: 1\n"
RACE_INVENTORY = "gpus:\n" + "".join(
    textwrap.dedent(
        f"""\
          - index: {gpu}
            uuid: GPU-{gpu}
            mig:
              slices: 7
              instances:
        """
    )
    + "".join(
        f"          - {{id: {i}, profile: 1g.10gb, uuid: MIG-{gpu}-{i}}}\n" for i in range(1, 5)
    )
    for gpu in (0, 1)
)


def _config_file(path: Path, state_dir: Path, etcd: str, listen: dict[str, str]) -> Path:
    (path.parent / "resource-limits.yaml").write_text(RACE_LIMITS)
    (path.parent / "inventory.yaml").write_text(RACE_INVENTORY)
    path.write_text(
        yaml.safe_dump(
            {
                "node": "n1",
                "state_dir": str(state_dir),
                "listen": listen,
                "etcd": {"endpoints": [etcd]},
                "limits_file": "resource-limits.yaml",
                "inventory": {"source": "declared", "file": "inventory.yaml"},
                "log_level": "warning",
            }
        )
    )
    return path


@pytest.fixture
def processes(
    tmp_path: Path, pki: Pki, state_dir: Path, etcd_endpoint: str
) -> Iterator[list[Path]]:
    """One limits process and three allocator processes, all real ds01d."""
    asyncio.run(wipe(etcd_endpoint, pki))
    limits_address = f"127.0.0.1:{free_port()}"
    started: list[subprocess.Popen[bytes]] = []
    configs = []
    for i, service in enumerate(("limits", "allocator", "allocator", "allocator")):
        listen = {"limits": limits_address}
        if service == "allocator":
            listen["allocator"] = f"127.0.0.1:{free_port()}"
        config = _config_file(tmp_path / f"ds01-{i}.yaml", state_dir, etcd_endpoint, listen)
        configs.append(config)
        started.append(subprocess.Popen([DS01D, "--config", str(config), "--services", service]))
    try:
        yield configs[1:]
    finally:
        for process in started:
            process.send_signal(signal.SIGTERM)
        for process in started:
            process.wait(timeout=30)


async def _wait_serving(client: Ds01Client) -> None:
    """The allocator's own health: SERVING once its etcd, its limits channel and its
    node registration all answer (not just the limits service seen from here)."""
    for _ in range(600):
        try:
            if await client.health("allocator") == "SERVING":
                return
        except Ds01Error:
            pass
        await asyncio.sleep(0.05)
    raise AssertionError("allocator never came up")


async def test_200_concurrent_allocations_from_50_users_through_3_allocators(
    processes: list[Path], pki: Pki
):
    identity = ClientIdentity(pki.ca_cert, pki.service("containers"))
    clients = [Ds01Client(load_config(path), identity, timeout=60) for path in processes]
    try:
        for client in clients:
            await _wait_serving(client)

        async def attempt(i: int) -> tuple[str, list[str]] | grpc.StatusCode:
            user = f"user{i % 50}"
            try:
                response = await clients[i % 3].allocate(f"c{i}._.{user}", user=user)
            except Ds01Error as err:
                return err.code
            return user, [a.slot.slot_id for a in response.allocations]

        results = await asyncio.gather(*(attempt(i) for i in range(200)))
        status = await clients[0].gpu_status()
    finally:
        for client in clients:
            await client.close()

    granted = [r for r in results if isinstance(r, tuple)]
    refused = [r for r in results if not isinstance(r, tuple)]
    assert len(granted) == 8
    assert set(refused) == {grpc.StatusCode.RESOURCE_EXHAUSTED}
    slots = [slot for _, ids in granted for slot in ids]
    assert len(slots) == len(set(slots)) == 8  # no slot twice
    per_user = collections.Counter(user for user, _ in granted)
    assert max(per_user.values()) <= 2  # 2 x 1/7 <= 0.3 < 3 x 1/7
    held = [a for a in status.allocations if a.user]
    assert sorted(a.slot.slot_id for a in held) == sorted(slots)  # etcd agrees


LOCK_HOLDER = """
import asyncio, sys
from pathlib import Path
from ds01.allocator.etcd_state import EtcdState
from ds01.core.etcd import etcd_client
from ds01.core.pki import EtcdPki

async def main():
    client = etcd_client((sys.argv[1],), EtcdPki(Path(sys.argv[2])), "allocator")
    state = EtcdState(client, lock_ttl=2)
    lock = await state.lock_and_read("alice")  # the allocator's own lock, then no more
    assert lock.snapshot is not None
    print("locked", flush=True)
    await asyncio.sleep(600)

asyncio.run(main())
"""


async def test_a_killed_lock_holder_blocks_only_until_its_lease_expires(
    env: AllocatorEnv, etcd_endpoint: str
):
    holder = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        LOCK_HOLDER,
        etcd_endpoint,
        str(env.pki.etcd.root),
        stdout=asyncio.subprocess.PIPE,
        env={**os.environ},
    )
    try:
        assert (await asyncio.wait_for(holder.stdout.readline(), 20)).strip() == b"locked"
        async with env.client("alice") as alice:
            blocked = asyncio.ensure_future(alice.allocate("proj._.alice"))
            await asyncio.sleep(1.0)
            assert not blocked.done(), "alice's lock is held: her allocation must wait"
            holder.kill()  # kill -9: no clean-up, the lock key stays until its lease ends
            await holder.wait()
            granted = await asyncio.wait_for(blocked, 10)
        assert granted.allocations[0].slot.slot_id == "2:1"
    finally:
        if holder.returncode is None:
            holder.kill()
            await holder.wait()
