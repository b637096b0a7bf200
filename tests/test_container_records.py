"""Container records and their per-user index, on the suite's real etcd: a user's list
and create read the user's own records, whatever the fleet holds, and the index never
disagrees with the records: not after a change, a remove, or an upgrade from a ds01
that kept no index."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator

import aetcd
import pytest
import pytest_asyncio

from ds01.containers.adapters import (
    BY_USER,
    METADATA,
    Metadata,
    MetadataStore,
    record_key,
    user_key,
)
from ds01.core.config import Config
from ds01.core.etcd import connect


@pytest_asyncio.fixture(loop_scope="session")
async def etcd(suite_config: Config) -> AsyncIterator[aetcd.Client]:
    client = connect(suite_config, "containers")
    yield client
    await client.close()


@pytest_asyncio.fixture(loop_scope="session")
async def tag(etcd: aetcd.Client) -> AsyncIterator[str]:
    """Node and user names of this test alone (the suite's etcd is shared), and what
    was written under them removed after."""
    tag = uuid.uuid4().hex[:8]
    yield tag
    for found in await etcd.get_prefix(BY_USER.encode(), keys_only=True):
        if tag in found.key.decode():
            await etcd.delete(found.key)
    for node in ("a", "b"):
        await etcd.delete_prefix(record_key(METADATA, f"{node}{tag}", ""))


def record(tag: str, user: str, node: str, name: str) -> Metadata:
    return Metadata(
        docker_name=f"{name}._.{user}{tag}",
        name=name,
        user=f"{user}{tag}",
        image="img",
        container_id=f"id-{name}-{user}-{node}",
        node=f"{node}{tag}",
        created_at=1.0,
    )


def names(records: list[Metadata]) -> set[tuple[str, str]]:
    return {(r.node, r.docker_name) for r in records}


@pytest.mark.asyncio(loop_scope="session")
async def test_a_users_records_come_from_their_index_on_every_node(etcd: aetcd.Client, tag: str):
    stores = {node: MetadataStore(etcd, f"{node}{tag}") for node in ("a", "b")}
    # Users whose names prefix one another's: none may see another's records.
    users = ("al", "alice", "alice2", "alice.x")
    made = [record(tag, u, n, c) for u in users for n in ("a", "b") for c in ("x", "y")]
    for r in made:
        assert await stores[r.node.removesuffix(tag)].put_new(r)

    for user in users:
        mine = {(r.node, r.docker_name) for r in made if r.user == f"{user}{tag}"}
        assert names(await stores["a"].of_user(f"{user}{tag}")) == mine
        here = {(n, d) for n, d in mine if n == f"a{tag}"}
        assert names(await stores["a"].of_user(f"{user}{tag}", here=True)) == here

    # A change shows in the user's list; a remove takes it from the list too.
    first = made[0]
    changed = await stores["a"].modify(first, lambda m: setattr(m, "status", "running"))
    assert changed is not None
    [seen] = [r for r in await stores["a"].of_user(first.user, here=True) if r.name == first.name]
    assert seen.status == "running" and seen.node == first.node
    await stores["a"].delete(changed)
    assert (first.node, first.docker_name) not in names(await stores["a"].of_user(first.user))
    assert await stores["a"].get(first.docker_name) is None

    # A remove of a container never deletes the record of one made anew under its name.
    kept = made[4]  # alice on node a
    earlier = Metadata.decode(kept.encode())
    earlier.container_id = "id-of-an-earlier-container"
    await stores["a"].delete(earlier)
    assert (await stores["a"].get(kept.docker_name)).container_id == kept.container_id
    assert (kept.node, kept.docker_name) in names(await stores["a"].of_user(kept.user))

    # A record an older ds01 wrote (fewer fields, so other bytes than ds01 writes now)
    # is removed with its copy all the same.
    older = made[5]  # alice on node a
    fields = json.loads(older.encode())
    del fields["notice"], fields["status"]
    await etcd.put(record_key(METADATA, older.node, older.docker_name), json.dumps(fields).encode())
    await stores["a"].delete(older)
    assert await stores["a"].get(older.docker_name) is None
    assert (older.node, older.docker_name) not in names(await stores["a"].of_user(older.user))

    # A record that changes hands leaves its old owner's list.
    moved = made[1]
    await stores["a"].modify(moved, lambda m: setattr(m, "user", f"bob{tag}"))
    assert (moved.node, moved.docker_name) not in names(await stores["a"].of_user(moved.user))
    assert names(await stores["a"].of_user(f"bob{tag}")) == {(moved.node, moved.docker_name)}


def names_of(records: list[Metadata]) -> set[str]:
    return {r.docker_name for r in records}


@pytest.mark.asyncio(loop_scope="session")
@pytest.mark.parametrize("user", ["a/b", "/", "alice/", "../alice"])
async def test_a_user_name_with_a_slash_is_never_an_index_key(
    etcd: aetcd.Client, tag: str, user: str
):
    with pytest.raises(ValueError, match="contains '/'"):
        user_key(user)
    store = MetadataStore(etcd, f"a{tag}")
    await store.put_new(record(tag, "alice", "a", "x"))
    assert await store.of_user(user) == []  # nobody's records, not an error
    assert await store.of_user(f"alice{tag}/") == []


@pytest.mark.asyncio(loop_scope="session")
async def test_the_index_is_brought_up_to_date_with_records_an_earlier_ds01_wrote(
    etcd: aetcd.Client, tag: str
):
    """An upgrade: records without copies, a copy of a record removed by a ds01 without
    the index, a record moved to another owner, and a copy older than its record (left
    for the record's next change to rewrite). Records whose owner no user can have stay
    out of the index and do not stop it. Other nodes' copies are not touched."""
    store, other = MetadataStore(etcd, f"a{tag}"), MetadataStore(etcd, f"b{tag}")
    unindexed = [record(tag, "alice", "a", c) for c in ("x", "y")]
    for r in unindexed:  # as a ds01 before the index wrote them: the record alone
        await etcd.put(record_key(METADATA, r.node, r.docker_name), r.encode())
    older = record(tag, "alice", "a", "o")  # and with fewer fields than ds01 writes now
    fields = json.loads(older.encode())
    del fields["notice"], fields["status"]
    await etcd.put(record_key(METADATA, older.node, older.docker_name), json.dumps(fields).encode())
    unindexed.append(older)
    outdated = record(tag, "alice", "a", "z")
    await store.put_new(outdated)
    newer = Metadata.decode(outdated.encode())
    newer.status = "exited"
    await etcd.put(record_key(METADATA, newer.node, newer.docker_name), newer.encode())
    gone = record(tag, "alice", "a", "gone")
    await store.put_new(gone)
    await etcd.delete(record_key(METADATA, gone.node, gone.docker_name))
    moved = record(tag, "alice", "a", "m")
    await store.put_new(moved)
    moved.user = f"bob{tag}"
    await etcd.put(record_key(METADATA, moved.node, moved.docker_name), moved.encode())
    strange = record(tag, "alice", "a", "s")
    strange.user = "a/b"
    await etcd.put(record_key(METADATA, strange.node, strange.docker_name), strange.encode())
    elsewhere = record(tag, "alice", "b", "w")
    await other.put_new(elsewhere)
    await etcd.delete(record_key(METADATA, elsewhere.node, elsewhere.docker_name))

    assert await store.index() == 6  # three added, one removed, one moved (two)
    listed = {r.docker_name: r for r in await store.of_user(f"alice{tag}", here=True)}
    assert set(listed) == {r.docker_name for r in (*unindexed, outdated)}
    assert names_of(await store.of_user(f"bob{tag}")) == {moved.docker_name}
    assert listed[outdated.docker_name].status == ""  # as its copy says, until:
    await store.modify(newer, lambda m: setattr(m, "notice", "seen"))
    [rewritten] = [r for r in await store.of_user(f"alice{tag}") if r.name == "z"]
    assert (rewritten.status, rewritten.notice) == ("exited", "seen")
    assert await store.index() == 0  # nothing left to do: it changes nothing twice
    # b's copy is b's to mend: a's containers service never deletes it.
    assert names_of(await other.of_user(f"alice{tag}", here=True)) == {elsewhere.docker_name}
    assert await other.index() == 1
    assert await other.of_user(f"alice{tag}", here=True) == []
