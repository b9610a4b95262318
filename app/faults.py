"""Fault injection for failure tests and drills, off unless FAULT_FILE is set.

The file holds one rule per line and is re-read when it changes, so a test (or an operator running a
drill) can switch a failure on and off while the worker runs:
    publish:<topic>          every send to <topic> fails (as a broker that refuses it would)
    score:<pipeline>         scoring of <pipeline> raises a transient error
    score_poison:<event id>  the model raises on the row of that event (a poison input)
    crash:<event id>         the worker process dies (SIGKILL) when it reads that event, as a
                             native crash on a record would: every worker that takes it dies
"""
from __future__ import annotations

import logging
import os
import signal

from aiokafka.errors import KafkaTimeoutError

from app.errors import Transient

log = logging.getLogger(__name__)


class Faults:
    def __init__(self, path: str) -> None:
        self.path = path
        self._mtime: float | None = None
        self._rules: frozenset[str] = frozenset()

    @property
    def rules(self) -> frozenset[str]:
        if not self.path:
            return frozenset()
        try:
            mtime = os.stat(self.path).st_mtime_ns
        except FileNotFoundError:
            self._mtime, self._rules = None, frozenset()
            return self._rules
        if mtime != self._mtime:
            with open(self.path) as f:
                self._rules = frozenset(line.strip() for line in f if line.strip())
            self._mtime = mtime
        return self._rules

    def check_publish(self, topic: str) -> None:
        if f"publish:{topic}" in self.rules:
            raise KafkaTimeoutError(f"injected publish failure for topic {topic}")

    def check_score(self, pipeline: str) -> None:
        if f"score:{pipeline}" in self.rules:
            raise Transient(f"injected transient scoring failure for {pipeline}")

    def crash_ids(self) -> frozenset[str]:
        return frozenset(rule[6:] for rule in self.rules if rule.startswith("crash:"))

    def crash(self, event_id: str) -> None:
        log.critical("fault injection: crash on event %s", event_id)
        os.kill(os.getpid(), signal.SIGKILL)

    def poisoned(self, event_ids: list[str]) -> str | None:
        rules = self.rules
        return next((e for e in event_ids if f"score_poison:{e}" in rules), None)


def install_publish_faults(app, faults: Faults) -> None:
    """Wrap the Faust producer so injected failures surface exactly like broker errors do."""
    if not faults.path:
        return
    producer = app.producer
    send = producer.send

    async def faulty_send(topic, key, value, partition, timestamp, headers, **kw):
        try:
            faults.check_publish(topic)
        except KafkaTimeoutError as exc:
            fut = app.loop.create_future()
            fut.set_exception(exc)
            return fut
        return await send(topic, key, value, partition, timestamp, headers, **kw)

    producer.send = faulty_send

    # The commit gate hands whole record batches to the producer (app.gate.submit_batch).
    from app import gate

    submit = gate.submit_batch

    async def faulty_submit(producer, topic, partition, batch):
        faults.check_publish(topic)  # raises like a producer that refuses the batch
        return await submit(producer, topic, partition, batch)

    gate.submit_batch = faulty_submit
