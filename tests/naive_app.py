"""Control app for the publish-failure test: the textbook Faust agent, no commit gate.

It consumes the same input and publishes with `await topic.send()`, letting Faust ack and commit on
its own schedule. Under the same injected publish failure it commits the offsets and the outputs
are lost; the real app holds the offsets until the outputs are acknowledged.
"""
import faust

from app.dev.faults import Faults
from app.settings import current

settings = current()

app = faust.App(
    "naive",
    broker=settings.broker_url,
    web_port=settings.web_port,
    datadir=str(settings.data_dir),
    topic_partitions=settings.partitions,
    broker_rebalance_timeout=settings.rebalance_timeout_s,
    broker_session_timeout=settings.session_timeout_s,
    broker_heartbeat_interval=settings.heartbeat_s,
    broker_commit_interval=settings.commit_interval_s,
    consumer_auto_offset_reset="earliest",
)
source = app.topic("cart_events", value_type=bytes, value_serializer="raw")
output = app.topic("naive_scores", value_type=bytes, value_serializer="raw")


@app.agent(source)
async def naive(stream):
    async for value in stream:
        await output.send(value=value)


@app.on_worker_init.connect
def _faults(*args, **kwargs):
    Faults(settings.fault_file).wrap_faust_send(app)
