"""The ways into a container (open, exec, logs, stats), the docker names (ls, ps, rm) and
the questions before a loss, run as real users through the real ds01 CLI, with and
without a terminal, against all four services and the gateway."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import re
import shlex
import shutil
import subprocess
import textwrap
from collections.abc import Iterator
from pathlib import Path

import click
import pytest

from ds01.cli.main import cli
from ds01.core.pki import issue_client_cert
from tests.allocator_env import AllocatorEnv, full_stack_fixture
from tests.harness import DS01, GROUP, USERS, ds01_as

pytestmark = pytest.mark.usefixtures("unix_users")

ALICE, BOB = "ds01alice", "ds01bob"
LIMITS = textwrap.dedent(
    """\
    defaults:
      max_gpu_equivalents: 1
      max_gpu_slots_per_container: 1
      gpu_hold_after_stop: 2h
      priority: 10
    """
)


stack = full_stack_fixture(LIMITS)


async def test_open_exec_logs_and_stats_reach_the_users_own_container(
    stack: AllocatorEnv, test_image: str
):
    run = await ds01_as(stack, ALICE, "container", "run", "box", "--image", test_image)
    assert run.returncode == 0, run.stderr
    probe = "tty; id -u; pwd"
    # With a terminal: a real one in the container, as the user, in /workspace.
    opened = await ds01_as(stack, ALICE, "container", "open", "box", "--", "sh", "-c", probe,
                           tty=True)  # fmt: skip
    assert opened.returncode == 0, opened.stdout + opened.stderr
    lines = opened.stdout.split()
    assert lines[0].startswith("/dev/pts/"), opened.stdout
    assert lines[1:] == [str(USERS[ALICE]), "/workspace"]
    # Without one (a script, a pipe): no terminal asked for, the same user and place.
    piped = await ds01_as(stack, ALICE, "container", "exec", "box", "--", "sh", "-c", probe)
    assert piped.returncode == 0, piped.stderr
    assert piped.stdout.splitlines() == ["not a tty", str(USERS[ALICE]), "/workspace"]
    # exec's input is the caller's, as with docker exec -i.
    echoed = await ds01_as(stack, ALICE, "container", "exec", "box", "--", "cat", answer="hi\n")
    assert echoed.stdout == "hi\n", echoed.stderr
    wrote = "echo written-by-box > /proc/1/fd/1"
    await ds01_as(stack, ALICE, "container", "exec", "box", "--", "sh", "-c", wrote)
    logged = await ds01_as(stack, ALICE, "container", "logs", "box")
    assert "written-by-box" in logged.stdout, logged.stderr
    tailed = await ds01_as(stack, ALICE, "container", "logs", "--tail", "1", "-t", "box")
    assert tailed.stdout.count("\n") == 1 and "written-by-box" in tailed.stdout
    measured = await ds01_as(stack, ALICE, "container", "stats", "box")  # no terminal: once
    assert measured.returncode == 0, measured.stderr
    assert "box._.ds01alice" in measured.stdout and "MEM USAGE" in measured.stdout
    # Someone else's container is out of reach by every one of these.
    for command in (["open", "box._.ds01alice"], ["exec", "box._.ds01alice", "--", "id"],
                    ["logs", "box._.ds01alice"], ["stats", "box._.ds01alice"]):  # fmt: skip
        refused = await ds01_as(stack, BOB, "container", *command)
        assert refused.returncode == 1, (command, refused.stdout)
        assert "belongs to ds01alice" in refused.stderr, (command, refused.stderr)
        assert "Traceback" not in refused.stderr


async def test_open_starts_a_stopped_container_and_exec_says_how(
    stack: AllocatorEnv, test_image: str
):
    made = await ds01_as(stack, ALICE, "container", "run", "nap", "--image", test_image,
                         "--gpus", "1")  # fmt: skip
    assert made.returncode == 0, made.stderr
    stopped = await ds01_as(stack, ALICE, "container", "stop", "nap")
    assert stopped.returncode == 0, stopped.stderr
    # stop says how long the GPU stays the container's, and how to keep it.
    assert "its GPU stays held for it until " in stopped.stdout
    assert "(1 h 59 min from now)" in stopped.stdout or "(2 h 0 min from now)" in stopped.stdout
    assert "`ds01 container start nap` before then keeps it" in stopped.stdout
    refused = await ds01_as(stack, ALICE, "container", "exec", "nap", "--", "true")
    assert refused.returncode == 1
    assert "nap is stopped: `ds01 container open nap` starts it" in refused.stderr
    opened = await ds01_as(stack, ALICE, "container", "open", "nap", "--", "echo", "awake")
    assert opened.returncode == 0 and opened.stdout == "awake\n", opened.stderr
    listed = await ds01_as(stack, ALICE, "container", "ps")
    assert listed.stdout.splitlines()[1].split()[:3] == ["nap", ALICE, "running"]


async def test_rm_asks_before_removing_a_running_container(stack: AllocatorEnv, test_image: str):
    run = await ds01_as(stack, ALICE, "container", "run", "keep", "--image", test_image)
    assert run.returncode == 0, run.stderr
    # No terminal to ask on: refused, with what to do.
    unasked = await ds01_as(stack, ALICE, "container", "rm", "keep")
    assert unasked.returncode == 1
    assert "keep is running: stop it first, or remove it anyway with --force" in unasked.stderr
    # A terminal: asked; no (or just Enter) keeps it.
    for answer in ("n\n", "\n"):
        kept = await ds01_as(stack, ALICE, "container", "rm", "keep", tty=True, answer=answer)
        assert "keep is running. Stop and remove it? [y/N]" in kept.stdout
        assert kept.returncode == 1 and "nothing removed" in kept.stdout
    listed = await ds01_as(stack, ALICE, "container", "ls")
    assert [line.split()[0] for line in listed.stdout.splitlines()[1:]] == ["keep"]
    yes = await ds01_as(stack, ALICE, "container", "rm", "keep", tty=True, answer="y\n")
    assert yes.returncode == 0 and "removed keep" in yes.stdout, yes.stdout
    for flag in ("-f", "--force", "-y", "--yes"):  # for scripts: no question
        again = await ds01_as(stack, ALICE, "container", "run", "keep", "--image", test_image)
        assert again.returncode == 0, again.stderr
        forced = await ds01_as(stack, ALICE, "container", "rm", flag, "keep")
        assert forced.returncode == 0 and forced.stdout == "removed keep\n", (flag, forced)
    # A stopped container goes without a question, as with docker rm.
    await ds01_as(stack, ALICE, "container", "run", "old", "--image", test_image)
    await ds01_as(stack, ALICE, "container", "stop", "old")
    gone = await ds01_as(stack, ALICE, "container", "remove", "old")
    assert gone.returncode == 0, gone.stderr
    assert (await ds01_as(stack, ALICE, "container", "list")).stdout.count("\n") <= 1


@pytest.fixture
def homeless() -> Iterator[str]:
    """A real account whose home directory was never made (as LDAP accounts can be)."""
    user = "ds01nohome"
    made = subprocess.run(["useradd", "-M", "-d", f"/home/{user}", "-u", "35009", "-g", GROUP,
                           user], capture_output=True, text=True)  # fmt: skip
    assert made.returncode == 0, made.stderr
    yield user
    subprocess.run(["userdel", user], capture_output=True)
    shutil.rmtree(f"/home/{user}", ignore_errors=True)


async def test_a_user_without_a_home_is_told_what_to_do_and_no_home_is_made(
    stack: AllocatorEnv, test_image: str, homeless: str
):
    home = Path(f"/home/{homeless}")
    enrolled = await ds01_as(stack, homeless, "enroll")
    assert enrolled.returncode == 1, enrolled.stdout
    assert enrolled.stderr.startswith(f"ds01: error: your home directory {home} does not exist")
    assert enrolled.stderr.count("\n") == 1 and "Traceback" not in enrolled.stderr
    # With a certificate from elsewhere, a create is refused before anything is made.
    run = await stack.cli(homeless, "container", "run", "x", "--image", test_image)
    assert run.returncode == 1, run.stdout
    assert f"{homeless}'s home directory {home} does not exist" in run.stderr
    assert "ask an admin to create it" in run.stderr
    assert not home.exists()
    listed = await stack.cli(homeless, "container", "list")
    assert listed.stdout.count("\n") <= 1  # nothing half-made is left to list


async def test_enroll_says_until_when_the_certificate_is_valid(stack: AllocatorEnv):
    enrolled = await ds01_as(stack, ALICE, "enroll")
    assert enrolled.returncode == 0, enrolled.stderr
    assert re.search(r"\(mode 0600\), valid until 20\d\d-\d\d-\d\d \d\d:\d\d", enrolled.stdout)


async def test_an_unreadable_configuration_is_one_sentence(stack: AllocatorEnv):
    secret = stack.config_file.with_name("secret.yaml")
    shutil.copy(stack.config_file, secret)
    secret.chmod(0o600)  # root's alone
    for args in (["limits"], ["container", "list"], ["enroll"], ["status"]):
        command = [DS01, "--config", str(secret), *args]
        refused = await asyncio.to_thread(
            subprocess.run, ["runuser", "-u", ALICE, "--", *command],
            capture_output=True, text=True, timeout=60, cwd="/",
        )  # fmt: skip
        assert refused.returncode != 0, args
        said = f"ds01: error: configuration: {secret}: cannot read it (permission denied)"
        assert refused.stderr.startswith(said), (args, refused.stderr)
        assert "ask an admin to make it readable" in refused.stderr
        assert refused.stderr.count("\n") == 1 and "Traceback" not in refused.stderr, args


def _commands(
    group: click.Group, path: tuple[str, ...] = ()
) -> Iterator[tuple[str, click.Command]]:
    for name, command in group.commands.items():
        if isinstance(command, click.Group):
            yield from _commands(command, (*path, name))
        else:
            yield " ".join((*path, name)), command


def _plainly(value: object, where: str) -> None:
    """No protobuf spelling left in JSON: no enum names, no numbers as strings."""
    if isinstance(value, dict):
        for key, item in value.items():
            _plainly(item, f"{where}.{key}")
    elif isinstance(value, list):
        for n, item in enumerate(value):
            _plainly(item, f"{where}[{n}]")
    elif isinstance(value, str):
        assert not re.fullmatch(r"[A-Z][A-Z0-9]*(_[A-Z0-9]+)+", value), (where, value)
        if not where.endswith(("id", "slot")):  # DS01's slot ids are "0", "1.2", "2:1"
            assert not re.fullmatch(r"-?\d+", value), (where, value)


async def test_every_commands_json_uses_the_tables_words_and_numbers(
    stack: AllocatorEnv, test_image: str
):
    """One walk over every command that prints JSON: each must be listed here, so a new
    one cannot slip through with protobuf's spelling."""
    user, admin = ALICE, "root"
    image = ["--image", test_image]
    runs: dict[str, tuple[str, list[str]]] = {
        "container create": (user, ["container", "create", "jc", *image, "-o", "json"]),
        "container run": (user, ["container", "run", "jr", *image, "--gpus", "1", "-o", "json"]),
        "container start": (user, ["container", "start", "jc", "-o", "json"]),
        "container stop": (user, ["container", "stop", "jr", "-o", "json"]),
        "container list": (user, ["container", "list", "-o", "json"]),
        "container inspect": (user, ["container", "inspect", "jr"]),
        "gpu status": (user, ["gpu", "status", "-o", "json"]),
        "gpu queue": (user, ["gpu", "queue", "-o", "json"]),
        "admin drain": (admin, ["admin", "drain", "n1/0", "--reason", "r", "-o", "json"]),
        "admin undrain": (admin, ["admin", "undrain", "n1/0", "-o", "json"]),
        "image list": (user, ["image", "list", "--all", "-o", "json"]),
        "gpu allocate": (
            admin,
            ["gpu", "allocate", "other._.ds01bob", "--user", BOB, "-o", "json"],
        ),
        "limits show": (user, ["limits", "show", "-o", "json"]),
        "limits show --docker-args": (user, ["limits", "show", "--docker-args", "-o", "json"]),
        "limits check": (admin, ["limits", "check", "-o", "json"]),
        "limits groups": (user, ["limits", "groups", "-o", "json"]),
        "events": (user, ["events", "-o", "json"]),
        "admin audit": (admin, ["admin", "audit", "-o", "json"]),
        "admin import-ds01": (admin, ["admin", "import-ds01", "--dry-run", "-o", "json"]),
        "admin owners": (admin, ["admin", "owners", "-o", "json"]),
        "admin users": (admin, ["admin", "users", "-o", "json"]),
        "usage": (user, ["usage", "-o", "json"]),
        "top": (user, ["top", "-o", "json"]),
        "status": (user, ["-o", "json", "status"]),
        "whoami": (user, ["-o", "json", "whoami"]),
    }
    printing = {name for name, c in _commands(cli) if any(p.name == "output" for p in c.params)}
    assert printing <= {name.removesuffix(" --docker-args") for name in runs}, "add it here"
    for name, (who, args) in runs.items():
        done = await stack.cli(who, *args)
        assert done.returncode == 0, (name, done.stderr)
        if name in ("events", "admin audit"):  # one object a line, as a log
            found = [json.loads(line) for line in done.stdout.splitlines()]
        else:
            found = json.loads(done.stdout)
        _plainly(found, name)
        if name == "events":
            assert {e["type"] for e in found} >= {"allocated", "created", "stopped"}, found
    listed = await stack.cli(user, *runs["container list"][1])
    states = {c["name"]: c["state"] for c in json.loads(listed.stdout)}
    assert states == {"jc": "running", "jr": "stopped"}


def test_every_option_and_command_says_what_it_is_for():
    groups = [("", cli), *((n, c) for n, c in cli.commands.items() if isinstance(c, click.Group))]
    for name, command in [*groups, *_commands(cli)]:
        assert command.help, f"ds01 {name} has no help text"
        if name:  # and an example of its use, as --help shows it
            shown = command.get_help(click.Context(command, info_name=name))
            examples = shown.partition("Example")[2].splitlines()
            assert any(line.strip().startswith("ds01 ") for line in examples), (name, shown)
        for param in command.params:
            if isinstance(param, click.Option) and param.name != "help":
                assert param.help, f"ds01 {name} {param.opts[0]} has no help text"


async def test_the_shell_completes_commands_and_the_callers_own_container_names(
    stack: AllocatorEnv, test_image: str
):
    for user, name in ((ALICE, "box1"), (ALICE, "bar2"), (BOB, "bobs")):
        made = await stack.cli(user, "container", "create", name, "--image", test_image)
        assert made.returncode == 0, made.stderr

    async def complete(user: str, *words: str) -> list[str]:
        line = ["ds01", "--config", str(stack.config_file), *words]
        environment = ["_DS01_COMPLETE=bash_complete", f"COMP_WORDS={shlex.join(line)}",
                       f"COMP_CWORD={len(line) - 1}"]  # fmt: skip
        argv = ["runuser", "-u", user, "--", "env", f"HOME=/home/{user}", *environment, DS01]
        done = await asyncio.to_thread(
            subprocess.run, argv, capture_output=True, text=True, timeout=60, cwd="/"
        )
        assert done.returncode == 0, done.stderr
        return [line.split(",", 1)[1] for line in done.stdout.splitlines()]

    assert await complete(ALICE, "container", "op") == ["open"]
    assert await complete(ALICE, "container", "open", "b") == ["bar2", "box1"]
    assert await complete(ALICE, "container", "rm", "bo") == ["box1"]
    assert await complete(BOB, "container", "logs", "") == ["bobs"]  # never another's
    for shell, marker in (("bash", "complete -o nosort -F"), ("zsh", "compdef")):
        script = await asyncio.to_thread(
            subprocess.run, [DS01], env={"_DS01_COMPLETE": f"{shell}_source"},
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert marker in script.stdout, (shell, script.stdout[:200])


async def test_limits_watch_shows_the_limits_now_then_each_change(stack: AllocatorEnv):
    paths = stack.pki.client(ALICE)
    if not paths.cert.is_file():
        issue_client_cert(stack.pki, ALICE)
    environment = {**os.environ, "DS01_CERT": str(paths.cert), "DS01_KEY": str(paths.key)}
    watching = await asyncio.create_subprocess_exec(
        DS01, "--config", str(stack.config_file), "limits", "watch",
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=environment,
    )  # fmt: skip
    assert watching.stdout is not None
    try:

        async def upto(text: str) -> list[str]:
            lines: list[str] = []
            while not lines or text not in lines[-1]:
                line = await asyncio.wait_for(watching.stdout.readline(), 20)
                assert line, f"ended before {text!r}: {lines}"
                lines.append(line.decode().rstrip("\n"))
            return lines

        now = await upto("(watching configuration ")  # at once, not at the first change
        assert now[0] == f"User: {ALICE}" and "Max GPU Slots per Container: 1" in now
        limits_file = Path(stack.config.limits_file)
        limits_file.write_text(LIMITS.replace("max_gpu_slots_per_container: 1",
                                              "max_gpu_slots_per_container: 2"))  # fmt: skip
        changed = await upto("Max GPU Slots per Container: ")
        assert f"limits changed for {ALICE}" in changed[0] or "every unlisted user" in changed[0]
        assert changed[-1] == "Max GPU Slots per Container: 2"
    finally:
        watching.terminate()
        await watching.wait()


async def test_admins_see_who_owns_what_and_stop_a_users_containers(
    stack: AllocatorEnv, test_image: str
):
    for user, name, gpus in ((ALICE, "a1", "1"), (ALICE, "a2", "0"), (BOB, "b1", "0")):
        made = await stack.cli(user, "container", "run", name, "--image", test_image,
                               "--gpus", gpus)  # fmt: skip
        assert made.returncode == 0, made.stderr
    listed = await stack.cli("root", "admin", "owners", "-o", "json")
    owned = {o["name"]: (o["owner"], o["source"]) for o in json.loads(listed.stdout)}
    assert {n: owned[n] for n in ("a1._.ds01alice", "a2._.ds01alice", "b1._.ds01bob")} == {
        "a1._.ds01alice": (ALICE, "ds01_label"),
        "a2._.ds01alice": (ALICE, "ds01_label"),
        "b1._.ds01bob": (BOB, "ds01_label"),
    }
    bobs = await stack.cli("root", "admin", "owners", "--user", BOB)
    assert [line.split()[0] for line in bobs.stdout.splitlines()[1:]] == ["b1._.ds01bob"]
    one = await stack.cli("root", "admin", "owners", "a1._.ds01alice", "-o", "json")
    assert [o["owner"] for o in json.loads(one.stdout)] == [ALICE]
    # A user sees only their own, and no one else's by asking.
    mine = await stack.cli(ALICE, "admin", "owners", "-o", "json")
    assert {o["owner"] for o in json.loads(mine.stdout)} == {ALICE}
    theirs = await stack.cli(ALICE, "admin", "owners", "--user", BOB)
    assert theirs.returncode == 1 and "only admins" in theirs.stderr
    # The emergency stop: says whose, asks (or wants --yes), stops, keeps the GPU held.
    unsaid = await stack.cli("root", "admin", "stop")
    assert unsaid.returncode == 1 and "--user USER, or --all" in unsaid.stderr
    unasked = await stack.cli("root", "admin", "stop", "--user", ALICE)
    assert unasked.returncode == 1 and "add --yes to do it" in unasked.stderr
    assert "a1._.ds01alice" in unasked.stderr and "b1" not in unasked.stderr
    refused = await stack.cli(ALICE, "admin", "stop", "--all", "--yes")
    assert refused.returncode == 1 and "PERMISSION_DENIED" in refused.stderr
    stopped = await stack.cli("root", "admin", "stop", "--user", ALICE, "--yes", "--grace", "1")
    assert stopped.returncode == 0, stopped.stderr
    assert sorted(stopped.stdout.splitlines()) == [
        f"stopped a1._.ds01alice ({ALICE})",
        f"stopped a2._.ds01alice ({ALICE})",
    ]
    states = json.loads((await stack.cli("root", "container", "list", "--all", "-o",
                                         "json")).stdout)  # fmt: skip
    assert {c["name"]: c["state"] for c in states} == {
        "a1": "stopped",
        "a2": "stopped",
        "b1": "running",
    }
    [held] = [c["gpus"] for c in states if c["name"] == "a1"]
    assert [g["state"] for g in held] == ["held"]
    # Every name `list --all` shows is one the other commands take.
    shown = await stack.cli("root", "container", "list", "--all")
    for name in [line.split()[0] for line in shown.stdout.splitlines()[1:]]:
        inspected = await stack.cli("root", "container", "inspect", name)
        assert inspected.returncode == 0, (name, inspected.stderr)
        assert json.loads(inspected.stdout)["docker_name"] == name
    # Who is who, and what each holds: a1's GPU is still alice's while it is held.
    people = {u["user"]: u for u in json.loads((await stack.cli("root", "admin", "users", "-o",
                                                                "json")).stdout)}  # fmt: skip
    gpu = json.loads((await stack.cli("root", "gpu", "status", "--user", ALICE, "-o",
                                      "json")).stdout)["allocations"]  # fmt: skip
    assert people[ALICE] == {"user": ALICE, "group": people[ALICE]["group"], "admin": False,
                             "gpu_equivalents": round(gpu[0]["slot"]["gpu_equivalents"], 4),
                             "containers": 2}  # fmt: skip
    assert people[BOB]["containers"] == 1 and people[BOB]["gpu_equivalents"] == 0
    not_admin = await stack.cli(ALICE, "admin", "users")
    assert not_admin.returncode == 1 and "PERMISSION_DENIED" in not_admin.stderr
    again = await stack.cli("root", "admin", "stop", "--user", ALICE, "--yes")
    assert again.stdout.strip() == f"no running containers of {ALICE} on this node"


async def test_usage_shows_what_a_user_holds_beside_their_limits(
    stack: AllocatorEnv, test_image: str
):
    for args in (["run", "u1", "--gpus", "1"], ["stop", "u1"], ["run", "u2"]):
        done = await stack.cli(ALICE, "container", *args[:2], *(["--image", test_image]
                               if args[0] == "run" else []), *args[2:])  # fmt: skip
        assert done.returncode == 0, (args, done.stderr)
    found = json.loads((await stack.cli(ALICE, "usage", "-o", "json")).stdout)
    status = json.loads((await stack.cli(ALICE, "gpu", "status", "-o", "json")).stdout)
    [held] = [a for a in status["allocations"] if a["container"] == "u1._.ds01alice"]
    limits = json.loads((await stack.cli(ALICE, "limits", "-o", "json")).stdout)["limits"]
    assert found["user"] == ALICE
    assert found["gpu_equivalents"] == {
        "used": round(held["slot"]["gpu_equivalents"], 4),
        "limit": limits["max_gpu_equivalents"]["value"],
    }
    slot = f"{held['slot']['node']}/{held['slot']['slot_id']}"
    assert found["gpu_slots"] == [slot]
    assert found["containers"]["count"] == 2 and found["containers"]["running"] == 1
    [hold] = found["holds"]
    assert hold["container"] == "u1._.ds01alice" and hold["slot"] == slot
    until = dt.datetime.fromisoformat(hold["until"])  # gpu_hold_after_stop: 2h
    assert abs(until - dt.datetime.fromisoformat(held["hold_until"])) < dt.timedelta(seconds=1)
    assert dt.timedelta(hours=1.9) < until - dt.datetime.now(dt.UTC) <= dt.timedelta(hours=2)
    table = (await stack.cli(ALICE, "usage")).stdout.splitlines()
    assert table[0].startswith(f"{ALICE} (group ")
    assert table[1].split()[:4] == ["GPU-equivalents", f"{found['gpu_equivalents']['used']:g}",
                                    "of", "1"]  # fmt: skip
    assert f"held for stopped u1._.ds01alice: {slot} until " in table[3]
    # An admin sees the same for the user; another user cannot look.
    as_admin = json.loads((await stack.cli("root", "usage", "--user", ALICE, "-o", "json")).stdout)
    assert as_admin == found
    refused = await stack.cli(BOB, "usage", "--user", ALICE)
    assert refused.returncode == 1 and "Traceback" not in refused.stderr


async def test_create_chooses_the_kind_of_gpu_and_waits_in_the_queue_for_one(
    stack: AllocatorEnv, test_image: str
):
    run = ["container", "run", "--image", test_image]
    for name in ("m1", "m2", "m3"):  # every MIG slice of the node (3 x 2/7 <= bob's 1)
        made = await stack.cli(BOB, *run, name, "--mig", "-o", "json")
        assert made.returncode == 0, made.stderr
        [gpu] = json.loads(made.stdout)["gpus"]
        assert ":" in gpu["slot"]["slot_id"], gpu  # a MIG slice, not a full GPU
    full = await stack.cli(ALICE, *run, "f", "--full")
    assert full.returncode == 1 and "full GPU" in full.stderr, full.stderr
    busy = await stack.cli(ALICE, *run, "w", "--mig")
    assert busy.returncode == 1 and "not enough free MIG slots" in busy.stderr, busy.stderr
    waiting = asyncio.ensure_future(stack.cli(ALICE, *run, "w", "--mig", "--wait", "30s"))
    await asyncio.sleep(2)
    assert not waiting.done()  # queued, not refused
    freed = await stack.cli(BOB, "container", "rm", "-f", "m2")
    assert freed.returncode == 0, freed.stderr
    got = await asyncio.wait_for(waiting, 30)
    assert got.returncode == 0, got.stderr
    assert got.stdout.startswith("w._.ds01alice: running, n1/2:"), got.stdout
    bad = await stack.cli(ALICE, *run, "x", "--mig", "--wait", "soon")
    assert bad.returncode == 2 and "'--wait'" in bad.stderr and "such as 90s" in bad.stderr
    too_long = await stack.cli(ALICE, *run, "x", "--mig", "--wait", "25h")
    assert too_long.returncode == 1 and "between 0 and 24 hours" in too_long.stderr
    for name in ("m1", "m3"):
        await stack.cli(BOB, "container", "rm", "-f", name)


DEFAULT_GPU_LIMITS = textwrap.dedent(
    """\
    defaults:
      max_gpu_equivalents: 1
      max_gpu_slots_per_container: 3
      allow_full_gpu: false
      gpu_hold_after_stop: 2h
      priority: 10
    """
)


# A host configured as DS01 was: a create that names no GPU gets one MIG slice.
default_gpu_stack = full_stack_fixture(DEFAULT_GPU_LIMITS, default_gpus=1, default_gpu_kind="mig")


def _slots(result: subprocess.CompletedProcess[str]) -> list[str]:
    assert result.returncode == 0, result.stderr
    return [g["slot"]["slot_id"] for g in json.loads(result.stdout)["gpus"]]


async def test_gpus_all_takes_what_the_limits_allow_and_no_flag_takes_the_hosts_default(
    default_gpu_stack: AllocatorEnv, test_image: str
):
    stack = default_gpu_stack
    create = ["container", "create", "--image", test_image, "-o", "json"]
    # All bob may have: three slices (his cap is 3 slots; 3 x 2/7 is within 1.0).
    everything = _slots(await stack.cli(BOB, *create, "big", "--gpus", "all"))
    assert sorted(everything) == ["2:1", "2:2", "2:3"]
    # No flag: the host's default, one MIG slice, and there is none left.
    refused = await stack.cli(ALICE, *create, "plain")
    assert refused.returncode == 1 and "not enough free MIG slots" in refused.stderr
    assert (await stack.cli(BOB, "container", "rm", "-f", "big")).returncode == 0
    assert [s.split(":")[0] for s in _slots(await stack.cli(ALICE, *create, "plain"))] == ["2"]
    assert _slots(await stack.cli(ALICE, *create, "none", "--gpus", "0")) == []
    # What bob may still have once alice holds one: what is free, not his cap.
    assert len(_slots(await stack.cli(BOB, *create, "rest", "--gpus", "all"))) == 2
    for bad in ("some", "-1", "1.5"):
        wrong = await stack.cli(ALICE, *create, "x", "--gpus", bad)
        assert wrong.returncode == 2 and "is not a number of GPU slots or 'all'" in wrong.stderr


async def test_a_create_on_a_terminal_says_where_it_waits_in_the_queue(
    default_gpu_stack: AllocatorEnv, test_image: str
):
    stack = default_gpu_stack
    run = ["container", "run", "--image", test_image]
    assert (await stack.cli(BOB, *run, "all", "--gpus", "all")).returncode == 0
    waiting = asyncio.ensure_future(ds01_as(stack, ALICE, *run, "w", "--wait", "60s", tty=True))
    await asyncio.sleep(3.5)
    assert not waiting.done()
    listed = json.loads((await stack.cli(ALICE, "container", "ls", "-o", "json")).stdout)
    assert [(c["name"], c["state"], c["notice"]) for c in listed] == [
        ("w", "creating", "being created: getting its GPUs (or waiting for one)")
    ]
    assert (await stack.cli(BOB, "container", "rm", "-f", "all")).returncode == 0
    shown = await asyncio.wait_for(waiting, 60)
    assert shown.returncode == 0, shown.stdout
    # each step as it comes: the request's checks, the queue, then the answer
    assert "creating and starting w: checking the image and your limits" in shown.stdout
    assert "waiting for a GPU: number 1 of 1 in the queue" in shown.stdout
    assert "w._.ds01alice: running, n1/2:" in shown.stdout
    # In a pipe, no progress lines: the answer alone.
    piped = await ds01_as(stack, ALICE, "container", "create", "--image", test_image, "p",
                          "--gpus", "0")  # fmt: skip
    assert piped.stdout == f"p._.ds01alice: created, no GPU, image {test_image}\n", piped.stdout


async def test_top_shows_slots_users_containers_and_the_queue(stack: AllocatorEnv, test_image: str):
    run = ["container", "run", "--image", test_image]
    assert (await stack.cli(ALICE, *run, "t1", "--mig")).returncode == 0
    for name in ("b1", "b2"):  # with alice's, every MIG slice
        assert (await stack.cli(BOB, *run, name, "--mig")).returncode == 0
    waiting = asyncio.ensure_future(stack.cli(ALICE, *run, "t2", "--mig", "--wait", "60s"))
    await asyncio.sleep(2)
    seen = json.loads((await stack.cli(ALICE, "top", "-o", "json")).stdout)
    held = sorted((s["user"], s["container"]) for s in seen["slots"] if s["user"])
    assert held == [(ALICE, "t1._.ds01alice"), (BOB, ""), (BOB, "")]  # not bob's names
    users = {u["user"]: u for u in seen["users"]}
    # t2 is a container in the making while it waits: listed, not running.
    assert users[ALICE] == {"user": ALICE, "gpu_equivalents": round(2 / 7, 4), "slots": 1,
                            "containers": 2, "running": 1, "waiting": 1}  # fmt: skip
    assert users[BOB]["slots"] == 2 and users[BOB]["containers"] == 0  # hers alone to see
    assert {c["name"]: c["state"] for c in seen["containers"]} == {
        "t1": "running", "t2": "creating"
    }  # fmt: skip
    assert [(w["position"], w["user"], w["container"]) for w in seen["waiters"]] == [
        (1, ALICE, "t2._.ds01alice")
    ]
    assert seen["revision"] > 0 and dt.datetime.fromisoformat(seen["time"]).tzinfo
    everyone = json.loads((await stack.cli("root", "top", "-o", "json")).stdout)
    assert sorted(c["docker_name"] for c in everyone["containers"]) == [
        "b1._.ds01bob", "b2._.ds01bob", "t1._.ds01alice", "t2._.ds01alice"
    ]  # fmt: skip
    assert {u["user"]: u["containers"] for u in everyone["users"]}[BOB] == 2
    assert (await stack.cli(BOB, "container", "rm", "-f", "b2")).returncode == 0
    assert (await asyncio.wait_for(waiting, 30)).returncode == 0
    for user, names in ((ALICE, ("t1", "t2")), (BOB, ("b1",))):
        for name in names:
            await stack.cli(user, "container", "rm", "-f", name)


async def test_top_redraws_when_an_event_comes(stack: AllocatorEnv, test_image: str):
    """Live on a terminal: a container made while top runs shows at once, from its
    event (the timed redraw for the queue comes only after 5 s)."""
    watching = asyncio.ensure_future(
        ds01_as(stack, ALICE, "top", tty=True, within=("timeout", "-s", "INT", "4.5"))
    )
    await asyncio.sleep(2)
    made = await stack.cli(ALICE, "container", "create", "fresh", "--image", test_image)
    assert made.returncode == 0, made.stderr
    shown = await watching
    assert "ds01 top," in shown.stdout and "Your containers" in shown.stdout, shown.stdout
    assert "fresh" in shown.stdout, shown.stdout
    assert "Traceback" not in shown.stdout
    await stack.cli(ALICE, "container", "rm", "fresh")
