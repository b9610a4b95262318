"""Consumer fetch wait as a setting.

Faust 0.15 hard-codes `fetch_max_wait_ms=1500` for the worker consumer. Real Kafka answers a fetch as
soon as data arrives, so there it only bounds idle polling; Tansu answers only when the wait
expires, so there it *is* the latency floor. The wait must be chosen per broker (FETCH_WAIT_MS).
"""
from __future__ import annotations

from faust.transport.drivers import aiokafka as faust_aiokafka

_original = faust_aiokafka.AIOKafkaConsumerThread._create_worker_consumer


def install(fetch_wait_ms: int) -> None:
    def create_worker_consumer(self, transport):
        consumer = _original(self, transport)
        consumer._fetch_max_wait_ms = fetch_wait_ms  # read by the fetcher, created on start()
        return consumer

    faust_aiokafka.AIOKafkaConsumerThread._create_worker_consumer = create_worker_consumer
