"""Topic names are settings (issue 17): a worker on a cluster whose topics are named otherwise reads,
writes, hops, changelogs and dead-letters under those names only; the replay finds its letters there."""
from __future__ import annotations

import os
import subprocess
import sys

import orjson

from tests.harness import ROOT, latest_states, produce, read_json, read_topic
from tests.test_cart_pipeline import sample_events

TOPICS = {"CART_INPUT_TOPIC": "shop.cart.v2", "CART_OUTPUT_TOPIC": "shop.propensity", "DEAD_LETTER_TOPIC": "shop.dlq",
          "INTERNAL_TOPIC_PREFIX": "scorer", "PIPELINES": "cart"}


def test_a_worker_uses_the_topic_names_it_is_given(broker, workers):
    import asyncio

    events = sample_events(n_users=12, seed=4)
    workers("w1", env=TOPICS)
    records = [(e["user_id"].encode(), orjson.dumps(e)) for e in events] + [(b"u-bad", b"{not json")]
    asyncio.run(produce(broker, "shop.cart.v2", records))  # keyed by both partitioners: some take the hop

    out = read_json(broker, "shop.propensity", len(events), key="event_id")
    assert {o["event_id"] for o in out} == {e["event_id"] for e in events}
    letters = read_topic(broker, "shop.dlq", lambda rs: len(rs) >= 1, timeout=30)
    assert [r.value for r in letters] == [b"{not json"]
    assert read_topic(broker, "scorer-shop.cart.v2-by-user_id", lambda rs: len(rs) >= 1, timeout=10), \
        "records not keyed by murmur2 made the hop under the prefix"
    states = latest_states(broker, "scorer-user_sessions-changelog", {e["user_id"] for e in events})
    assert len(states) == len({e["user_id"] for e in events})
    for default in ("cart_events", "personalization_scores", "dead_letters", "scoring-user_sessions-changelog"):
        assert read_topic(broker, default, timeout=2) == [], f"nothing written to {default}"

    dry = subprocess.run([sys.executable, "-m", "app.cli", "replay-dead-letters", "--dry-run", "--broker", broker.url],
                         cwd=ROOT, env={**os.environ, **TOPICS}, capture_output=True, text=True, timeout=60)
    assert dry.returncode == 0, dry.stderr
    assert "would replay 1 dead letter(s)" in dry.stdout and "-> shop.cart.v2" in dry.stdout
