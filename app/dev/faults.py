"""Fault injection for failure tests and drills, off unless FAULT_FILE is set.

The wiring (app/main.py) hands a `Faults` to the parts that have a seam for it: the batch producer
(app/kafka/producer.py: publish), the processor and its scoring (score, score_poison, crash);
`wrap_faust_send` covers Faust's own `producer.send` (the stock-Faust control app of the tests).

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

    def wrap_faust_send(self, app) -> None:
        """Faust's producer.send fails for a refused topic as a broker error would (its future)."""
        producer = app.producer
        send = producer.send

        async def faulty_send(topic, key, value, partition, timestamp, headers, **kw):
            try:
                self.check_publish(topic)
            except KafkaTimeoutError as exc:
                fut = app.loop.create_future()
                fut.set_exception(exc)
                return fut
            return await send(topic, key, value, partition, timestamp, headers, **kw)

        producer.send = faulty_send
