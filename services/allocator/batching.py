"""Group commit: the claims and releases one process has under way at once go to etcd
as one transaction, each nested in it with its own comparisons.

Every request still holds or fails on its own comparisons alone (etcd evaluates each
nested transaction by itself, in order), so batching changes what each costs, not what
it decides: one round trip, one log entry and one watch message for a whole batch
instead of one each. A request that finds nothing under way is sent at once, alone:
batching never delays a request that would not have waited anyway.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import aetcd
from aetcd import rtypes, transactions

MOST_PER_BATCH = 64  # nested transactions in one; etcd allows 128 operations a level


@dataclass(eq=False)
class _Queued:
    txn: transactions.Txn
    writes: frozenset[bytes] | None  # the keys it writes; None: it goes alone
    answer: asyncio.Future[tuple[bool, list]] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


def _writes(ops: list) -> frozenset[bytes] | None:
    """The keys ``ops`` put or delete; None where that cannot be told simply (a range
    delete, a nested transaction). etcd refuses a transaction that writes one key twice,
    so two requests that write the same key never share a batch."""
    keys = []
    for op in ops:
        if isinstance(op, transactions.Get):
            continue
        if isinstance(op, transactions.Delete) and op.range_end:
            return None
        if not isinstance(op, transactions.Put | transactions.Delete):
            return None
        keys.append(op.key)
    return frozenset(keys)


def _answer(response: object) -> tuple[bool, list]:
    """A nested transaction's outcome, in the shape ``aetcd.Client.transaction`` gives."""
    txn = response.response_txn  # type: ignore[attr-defined]
    results: list = []
    for op in txn.responses:
        if op.WhichOneof("response") == "response_range":
            found = op.response_range
            results.append([(kv.value, rtypes.Get(found.header, kv)) for kv in found.kvs])
        else:
            results.append(op)
    return txn.succeeded, results


class TxnBatcher:
    """Sends transactions of one etcd client, batching those that arrive while one is
    on its way (at most one batch under way at a time: the next forms meanwhile)."""

    def __init__(self, client: aetcd.Client, most: int = MOST_PER_BATCH) -> None:
        self.client = client
        self.most = most
        self._queue: list[_Queued] = []
        self._sending = False
        self._sender: asyncio.Future[None] | None = None
        self.requests = 0  # requests sent, for the metrics: their ratio is the batching
        self.transactions = 0  # etcd transactions they went in

    async def transaction(self, compare: list, success: list, failure: list) -> tuple[bool, list]:
        """As ``aetcd.Client.transaction``. A caller cancelled before its request left
        takes it back: nothing of it reaches etcd; once it has left, it may commit."""
        if not self._sending:  # nothing under way: this caller sends its own, at once
            self._sending = True
            try:
                return await self._alone(compare, success, failure)
            finally:
                self._next()
        item = _Queued(
            self.client.transactions.txn(compare, success, failure), _writes(success + failure)
        )
        self._queue.append(item)
        try:
            return await item.answer
        except asyncio.CancelledError:
            if item in self._queue:
                self._queue.remove(item)
            raise

    def _next(self) -> None:
        """After a send: the requests that queued meanwhile go next, in a task of their
        own (their callers wait on their answers, not on one another)."""
        if self._queue:
            self._sender = asyncio.ensure_future(self._send_queued())
        else:
            self._sending = False

    async def _send_queued(self) -> None:
        batch: list[_Queued] = []
        try:
            batch = self._take_batch()
            await self._send(batch)
        finally:
            for item in batch:  # this task was cancelled (the process stops)
                if not item.answer.done():
                    item.answer.cancel()
            self._next()

    def _take_batch(self) -> list[_Queued]:
        """The oldest requests that fit together: no two writing one key, none that
        must go alone beside others; the rest wait for the next batch, in order."""
        batch: list[_Queued] = []
        written: set[bytes] = set()
        rest: list[_Queued] = []
        for item in self._queue:
            fits = len(batch) < self.most and (
                not batch or (item.writes is not None and batch[0].writes is not None)
            )
            if fits and not written.intersection(item.writes or ()):
                batch.append(item)
                written.update(item.writes or ())
            else:
                rest.append(item)
        self._queue = rest
        return batch

    async def _alone(self, compare: list, success: list, failure: list) -> tuple[bool, list]:
        """One request as it is: no transaction around it."""
        self.requests += 1
        self.transactions += 1
        return await self.client.transaction(compare=compare, success=success, failure=failure)

    async def _send(self, batch: list[_Queued]) -> None:
        try:
            if len(batch) == 1:
                txn = batch[0].txn
                answers = [await self._alone(txn.compare, txn.success, txn.failure)]
            else:
                self.requests += len(batch)
                self.transactions += 1
                _, responses = await self.client.transaction(
                    compare=[], success=[item.txn for item in batch], failure=[]
                )
                answers = [_answer(response) for response in responses]
        except aetcd.exceptions.InvalidArgumentError as err:
            if len(batch) == 1:
                _fail(batch, err)
                return
            # etcd refused the whole for what one request asked (too many operations, a
            # value too large), so nothing of it committed: each alone, that only that
            # one fails (those whose callers have gone since, not at all).
            for item in batch:
                if not item.answer.done():
                    await self._send([item])
            return
        except Exception as err:  # etcd away or slow: every request of the batch failed
            _fail(batch, err)
            return
        for item, answer in zip(batch, answers, strict=True):
            if not item.answer.done():
                item.answer.set_result(answer)


def _fail(batch: list[_Queued], err: Exception) -> None:
    for item in batch:
        if not item.answer.done():
            item.answer.set_exception(err)
