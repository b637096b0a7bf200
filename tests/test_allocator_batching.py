"""Claims and releases under way at once share one etcd transaction (group commit), and
each still holds or fails on its own comparisons: a batch changes the cost, never an
answer. Against a real etcd: etcd is what decides what a nested transaction means."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aetcd
import pytest
import pytest_asyncio

from ds01.allocator.batching import TxnBatcher
from ds01.core.etcd import etcd_client
from ds01.core.pki import Pki

PREFIX = b"/ds01-test/batching/"


@pytest_asyncio.fixture(loop_scope="session")
async def etcd(etcd_endpoint: str, pki: Pki) -> AsyncIterator[aetcd.Client]:
    client = etcd_client((etcd_endpoint,), pki.etcd, "admin")
    await client.delete_prefix(PREFIX)
    yield client
    await client.delete_prefix(PREFIX)
    await client.close()


def key(name: str) -> bytes:
    return PREFIX + name.encode()


def claim(etcd: aetcd.Client, name: str, value: bytes = b"mine") -> tuple[list, list, list]:
    """Create ``name`` if nobody has: else read what is there (as a claim does)."""
    tx = etcd.transactions
    return [tx.create(key(name)) == 0], [tx.put(key(name), value)], [tx.get(key(name))]


async def test_requests_under_way_together_share_a_transaction_each_on_its_own_terms(
    etcd: aetcd.Client,
):
    await etcd.put(key("taken-3"), b"theirs")
    await etcd.put(key("taken-6"), b"theirs")
    batcher = TxnBatcher(etcd)
    names = [f"taken-{n}" if n in (3, 6) else f"free-{n}" for n in range(10)]
    answers = await asyncio.gather(*(batcher.transaction(*claim(etcd, n)) for n in names))

    for name, (succeeded, responses) in zip(names, answers, strict=True):
        if name.startswith("taken"):  # lost, with what etcd has instead: the others held
            assert not succeeded
            [[(value, found)]] = responses
            assert value == b"theirs" and found.key == key(name)
        else:
            assert succeeded
            assert responses[0].response_put.header.revision > 0
    revisions = {name: (await etcd.get(key(name))).mod_revision for name in names if "free" in name}
    # The first went alone (nothing was under way); the seven behind it, together.
    assert len(set(revisions.values())) == 2
    assert revisions["free-0"] < revisions["free-1"] == revisions["free-9"]
    assert (batcher.requests, batcher.transactions) == (10, 2)  # what the metrics say
    assert [(await etcd.get(key(n))).value for n in ("taken-3", "taken-6")] == [b"theirs"] * 2


@pytest.mark.parametrize("count", [2, 3, 8])
async def test_requests_that_write_one_key_go_in_turn_and_the_first_wins(
    etcd: aetcd.Client, count: int
):
    """etcd refuses a transaction that writes a key twice; the batcher never sends one."""
    batcher = TxnBatcher(etcd)
    others = [batcher.transaction(*claim(etcd, f"other-{n}")) for n in range(3)]
    same = [batcher.transaction(*claim(etcd, "one", f"by {n}".encode())) for n in range(count)]
    answers = await asyncio.gather(*same, *others)
    assert [succeeded for succeeded, _ in answers[:count]] == [True] + [False] * (count - 1)
    assert all(succeeded for succeeded, _ in answers[count:])
    assert (await etcd.get(key("one"))).value == b"by 0"
    # The rest in one batch, not one by one after etcd refused a batch that wrote twice.
    written = {(await etcd.get(key(f"other-{n}"))).mod_revision for n in range(3)}
    assert len(written) == 1


async def test_a_put_and_a_delete_of_one_key_never_share_a_batch(etcd: aetcd.Client):
    tx = etcd.transactions
    await etcd.put(key("slot"), b"old")
    batcher = TxnBatcher(etcd)
    first = batcher.transaction(*claim(etcd, "before"))
    release = batcher.transaction([], [tx.delete(key("slot")), tx.put(key("mark"), b"")], [])
    retake = batcher.transaction(*claim(etcd, "slot", b"new"))
    answers = await asyncio.gather(first, release, retake)
    assert [succeeded for succeeded, _ in answers] == [True, True, True]
    assert (await etcd.get(key("slot"))).value == b"new"


async def test_a_request_taken_back_before_it_left_never_reaches_etcd(etcd: aetcd.Client):
    batcher = TxnBatcher(etcd)
    first = asyncio.ensure_future(batcher.transaction(*claim(etcd, "sent")))
    await asyncio.sleep(0)  # on its way: what comes now waits for the next batch
    queued = [asyncio.ensure_future(batcher.transaction(*claim(etcd, f"q{n}"))) for n in range(3)]
    await asyncio.sleep(0)
    queued[1].cancel()
    assert (await first)[0]
    assert [succeeded for succeeded, _ in await asyncio.gather(queued[0], queued[2])] == [True] * 2
    with pytest.raises(asyncio.CancelledError):
        await queued[1]
    assert await etcd.get(key("q1")) is None  # never sent
    assert (await batcher.transaction(*claim(etcd, "after")))[0]  # and nothing is stuck


async def test_a_request_etcd_refuses_fails_alone(etcd: aetcd.Client):
    """A request etcd cannot take (more operations than it allows in one transaction)
    refuses the batch it is in: it fails, the requests beside it are sent alone."""
    tx = etcd.transactions
    batcher = TxnBatcher(etcd)
    first = batcher.transaction(*claim(etcd, "lead"))
    good = [batcher.transaction(*claim(etcd, f"good-{n}")) for n in range(3)]
    too_many = [tx.put(key(f"many-{n}"), b"") for n in range(200)]
    bad = batcher.transaction([], too_many, [])
    answers = await asyncio.gather(first, *good[:2], bad, good[2], return_exceptions=True)
    assert isinstance(answers[3], aetcd.exceptions.InvalidArgumentError)
    assert all(answer[0] for n, answer in enumerate(answers) if n != 3)
    assert await etcd.get(key("many-0")) is None
    assert None not in [await etcd.get(key(f"good-{n}")) for n in range(3)]


async def test_when_etcd_is_away_every_request_of_the_batch_says_so(pki: Pki):
    unreachable = etcd_client(("127.0.0.1:1",), pki.etcd, "admin")
    batcher = TxnBatcher(unreachable)
    try:
        answers = await asyncio.wait_for(
            asyncio.gather(
                *(batcher.transaction(*claim(unreachable, f"x{n}")) for n in range(4)),
                return_exceptions=True,
            ),
            60,
        )
    finally:
        await unreachable.close()
    assert all(isinstance(answer, aetcd.exceptions.ClientError) for answer in answers)
