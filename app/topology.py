"""Every topic the service reads or writes, named once from the settings, and declared on the app.

    <CART_INPUT_TOPIC>  --score_cart-->   <CART_OUTPUT_TOPIC>        (+ <prefix>-<input>-by-user_id hop)
    <FRAUD_INPUT_TOPIC> --score_fraud-->  <FRAUD_OUTPUT_TOPIC>       (+ <prefix>-<input>-by-card_id hop)
    any failure                      -->  <DEAD_LETTER_TOPIC>        --dead_letters--> stats table
    replayed letters, marked             <DEAD_LETTER_TOPIC>.replayed (compacted)
    promotions, read by every worker     <MODEL_CONTROL_TOPIC> (compacted, one partition)
    labels that come back later          <CART_LABEL_TOPIC>, <FRAUD_LABEL_TOPIC> (read by every worker)
    table state                          <prefix>-<table>-changelog  (Faust's recovery reads it)

Every topic the agents read or write is raw bytes in and out (the serde is declared here, once):
decoding happens inside the agent, where a bad record can become a dead letter; Faust's own
deserializer would log it and commit it.
"""
from __future__ import annotations

from dataclasses import dataclass

import faust

from app.pipelines import Pipeline, define

REPLAYED_SUFFIX = ".replayed"


@dataclass(frozen=True)
class Topology:
    pipelines: dict[str, Pipeline]  # every defined pipeline, whether this worker runs it or not
    dead_letters: str
    prefix: str  # of internal topics: repartition hops and changelogs
    partitions: int
    model_control: str  # which model each pipeline scores with (app/models/control.py)

    @classmethod
    def from_settings(cls, settings) -> "Topology":
        return cls(define(settings), settings.dead_letter_topic, settings.topic_prefix, settings.partitions,
                   settings.model_control_topic or f"{settings.topic_prefix}-model-control")

    @property
    def replayed(self) -> str:
        """Where the replay marks each letter it sent (compacted: one record per letter)."""
        return self.dead_letters + REPLAYED_SUFFIX

    @property
    def inputs(self) -> set[str]:
        """The topics a replayed dead letter may be sent to: never an output or a changelog."""
        return {p.source_topic for p in self.pipelines.values()}

    @property
    def names(self) -> list[str]:
        """Every topic name this service owns (a test keeps them distinct)."""
        out = [self.dead_letters, self.replayed, self.model_control]
        for p in self.pipelines.values():
            out += [p.source_topic, p.output_topic, p.repartition_topic, p.label_topic, self.changelog(p.table_name)]
        return out

    def changelog(self, table_name: str) -> str:
        return f"{self.prefix}-{table_name}-changelog"


def raw_topic(app: faust.App, partitions: int, *names: str) -> faust.TopicT:
    """A topic of raw bytes. internal=True: Faust creates it (if missing) with TOPIC_PARTITIONS before
    an agent subscribes; otherwise the broker auto-creates it with its own default count and the
    first table write fails with PartitionsMismatch against the changelog."""
    return app.topic(*names, key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw",
                     partitions=partitions, internal=True)
