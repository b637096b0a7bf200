"""A DS01 limits configuration as a lab writes it, for the limits tests."""

from __future__ import annotations

import textwrap
from pathlib import Path

from ds01.core.config import Config
from ds01.core.identity import Roles
from ds01.core.pki import SERVICES
from ds01.core.processes import free_port
from ds01.core.server import RunningService, ServiceContext, start_service
from ds01.limits.server import SPEC
from tests.harness import ANY_PORT_METRICS, write_config_file

# The seed's researchers example: alice gets exactly the block the seed README prints.
RESOURCE_LIMITS = textwrap.dedent(
    """\
    defaults:
      max_mig_instances: 1          # old name of max_gpu_equivalents
      max_mig_per_container: 1      # old name of max_gpu_slots_per_container
      max_cpus: 8
      memory: 32g
      memory_swap: 32g
      shm_size: 16g
      pids_limit: 4096
      max_containers_per_user: 2
      idle_timeout: 24h
      gpu_hold_after_stop: 12h
      container_hold_after_stop: 12h
      priority: 10

    default_group: students

    policies:
      warn_before_idle_stop: 1h
      exempt_from_idle: false

    groups:
      students:
        members: [student1]
      researchers:
        priority: 50
        max_mig_instances: 2
        max_cpus: 16
        memory: 64g
        memory_swap: 64g
        max_containers_per_user: 3
        idle_timeout: 72h
        gpu_hold_after_stop: 24h
        policies:
          exempt_from_idle: true
        aggregate:
          max_cpus: 32
          memory_max: 128g
          tasks_max: 8192
      faculty:
        priority: 80
        ipc_mode: host
        max_gpus_per_user: null     # unlimited GPUs
        max_cpus: 32
        allow_full_gpu: true
      admin:
        priority: 100
        members: [labadmin]

    access_control:
      admin_users: [root]
      admin_group: admin

    user_overrides:
      alice:
        policies:
          warn_before_idle_stop: 2h

    gpu_allocation:
      enable_mig: true
      mig_profile: 2g.20gb
      strategy: least_allocated
    """
)

RESEARCHERS_MEMBERS = textwrap.dedent(
    """\
    # researchers: one user a line
    alice
    h_baker_hertie-school_lan   # listed by the sanitized name
    carol  # also a faculty member below: researchers come first in the file
    """
)

FACULTY_MEMBERS = "carol\nd.jones@uni.example  # an LDAP name as it is\n"

USER_OVERRIDES = textwrap.dedent(
    """\
    d.jones@uni.example:
      max_cpus: 48
      memory: null        # unlimited memory for this user only
      memory_swap: null   # (Docker refuses --memory-swap without --memory)
      shm_size: 8g        # overrides the group's ipc_mode: host
    """
)


def write_config(directory: Path) -> Path:
    """Write the whole configuration into ``directory``; return resource-limits.yaml."""
    (directory / "groups").mkdir(parents=True, exist_ok=True)
    (directory / "groups" / "researchers.members").write_text(RESEARCHERS_MEMBERS)
    (directory / "groups" / "faculty.members").write_text(FACULTY_MEMBERS)
    (directory / "user-overrides.yaml").write_text(USER_OVERRIDES)
    path = directory / "resource-limits.yaml"
    path.write_text(RESOURCE_LIMITS)
    return path


SEED_BLOCK_ALICE = """\
User: alice
Group: researchers
Priority: 50
Max GPU-equivalents: 2
Max GPU Slots per Container: 1
Max CPUs: 16
Memory: 64g
Shared Memory: 16g
Max Containers: 3
Idle Timeout: 72h
GPU Hold After Stop: 24h
Container Hold After Stop: 12h
Max Runtime: unlimited"""


async def start_limits(
    state_dir: Path, limits_file: Path, config_path: Path
) -> tuple[Config, RunningService]:
    """The limits service alone, in this process, serving ``limits_file``; its suite
    configuration written to ``config_path`` for the CLI."""
    config = Config(
        state_dir=state_dir,
        listen={s: f"127.0.0.1:{free_port()}" for s in SERVICES},
        metrics=ANY_PORT_METRICS,
        limits_file=limits_file,
    )
    write_config_file(config, config_path)
    return config, await start_service(SPEC, ServiceContext(config=config, roles=Roles()))
