"""Train on recorded events: a JSON Lines file (gzip accepted) or a Kafka topic's retained history.

    read -> decode + validate every record with the worker's codec (`app.pipeline.codec.decode`, the use
            case's schema and check, MAX_EVENT_BYTES): what the worker would dead-letter is a bad
            record here, counted and reported (first few with their line number), never a crash
         -> keep the events inside --since/--until (event time; since inclusive, until exclusive)
         -> sort by event time, stable: events with equal `ts` keep their input order (line order
            of a file; for a topic, partition number then offset, so each key's events, which
            share a partition, keep the order a worker meets them in)
         -> replay through `training.train.fold`: the worker's `apply` / `features`, one state per key
         -> labels: cart, "this session buys later" read off the serving state (below); fraud,
            `--labels` JSON Lines of txn_id / label
         -> time split (last `holdout` by event time held out), LightGBM with the simulator
            training's parameters, and a baseline without the recency features
         -> held-out AUC and PR-AUC (average precision), precision / recall at the fraud thresholds,
            meta.json and report.html in the registry (`app.models.registry`); the new version becomes the
            current model only if there is none yet or `promote_local` is given.

Recency features: for cart, everything but event type, price, purchases so far and sessions so far
(`domain.session.BASELINE_FEATURES`: what a nightly profile knows); for fraud, everything that comes
from the card's state, leaving the transaction alone (amount, channel, mcc, hour of day:
`training.train_fraud.BASELINE_FEATURES`). These are the baselines of the simulator training.
"""
from __future__ import annotations

import asyncio
import gzip
import io
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import orjson
from tqdm import tqdm

from app.errors import Poison
from app.models import registry
from app.models.evaluate import at_threshold, average_precision, roc_auc
from app.pipeline.codec import decode
from app.pipelines import Pipeline, configured
from app.settings import current
from domain import session
from training import report
from training.train import fit, fold, iso, split, window, write_model
from training.train_fraud import BASELINE_FEATURES as FRAUD_BASELINE

BASELINE = {"cart": tuple(session.BASELINE_FEATURES), "fraud": tuple(FRAUD_BASELINE)}
ROUNDS = {"cart": 200, "fraud": 150}  # as the simulator training (training/train_cart.py, train_fraud.py)
SAMPLES = 5  # bad records reported by line number


class TrainingError(Exception):
    """A one-line reason why there is nothing to train on; the CLI prints it and exits non-zero."""


def parse_time(text: str | None) -> int | None:
    """--since / --until: epoch milliseconds, or ISO 8601 (a time without zone is UTC)."""
    if text is None:
        return None
    text = text.strip()
    if text.lstrip("-").isdigit():
        return int(text)
    try:
        dt = datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise TrainingError(f"{text!r} is neither epoch milliseconds nor an ISO 8601 time") from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return int(dt.timestamp() * 1000)


# -- reading ------------------------------------------------------------------------------------

@dataclass
class Recorded:
    """Valid events of one pipeline in replay order, and what was read to get them."""

    pipeline: str
    raws: list[bytes]   # record values exactly as read, in replay order
    ts: np.ndarray      # their event times (ms)
    source: dict        # kind, path or topic, counts, first bad records


@dataclass
class _Collector:
    pipe: Pipeline
    since: int | None
    until: int | None
    raws: list = field(default_factory=list)
    ts: list = field(default_factory=list)
    records: int = 0
    bad: int = 0
    outside: int = 0
    samples: list = field(default_factory=list)

    def add(self, value: bytes | None, where: str) -> None:
        self.records += 1
        try:
            event = decode(value, self.pipe.schema, current().max_event_bytes, self.pipe.check)
        except Poison as exc:
            self.bad += 1
            if len(self.samples) < SAMPLES:
                self.samples.append(f"{where}: {exc.stage}: {exc}")
            return
        ts = event["ts"]
        if (self.since is not None and ts < self.since) or (self.until is not None and ts >= self.until):
            self.outside += 1
            return
        self.raws.append(value)
        self.ts.append(ts)

    def result(self, source: dict, what: str) -> Recorded:
        source = {**source, "records": self.records, "events": len(self.raws), "bad": self.bad,
                  "bad_samples": self.samples, "outside_window": self.outside,
                  "since": self.since, "until": self.until}
        if not self.raws:
            if not self.records:
                raise TrainingError(f"{what} holds no events")
            if self.bad == self.records:
                first = f"; first: {self.samples[0]}" if self.samples else ""
                raise TrainingError(f"no record of {what} is a valid {self.pipe.name} event "
                                    f"({self.bad} bad{first})")
            raise TrainingError(f"no event of {what} lies in the event-time window "
                                f"[{_when(self.since)}, {_when(self.until)})")
        ts = np.array(self.ts, dtype=np.int64)
        order = np.argsort(ts, kind="stable")
        return Recorded(self.pipe.name, [self.raws[i] for i in order], ts[order], source)


def _when(ms: int | None) -> str:
    return "-" if ms is None else iso(ms)


def _bar(desc: str, total: int, unit: str, quiet: bool) -> tqdm:
    return tqdm(total=total, desc=desc, unit=unit, unit_scale=True, file=sys.stderr, disable=quiet,
                mininterval=0.5, dynamic_ncols=True)


def read_file(pipeline: str, path: Path, since: int | None = None, until: int | None = None,
              quiet: bool = False) -> Recorded:
    """JSON Lines of events (gzip recognised by its magic bytes, whatever the name); blank lines are
    skipped, any other line that the worker would dead-letter is a bad line."""
    path = Path(path)
    started = time.monotonic()
    collect = _Collector(configured()[pipeline], since, until)
    try:
        raw = open(path, "rb")
    except OSError as exc:
        raise TrainingError(f"cannot read {path}: {exc.strerror or exc}") from None
    with raw:
        size = path.stat().st_size
        zipped = raw.read(2) == b"\x1f\x8b"
        raw.seek(0)
        lines = io.BufferedReader(gzip.GzipFile(fileobj=raw)) if zipped else raw
        try:
            with _bar(f"reading {path.name}", size, "B", quiet) as bar:
                for n, line in enumerate(lines, 1):
                    value = line.rstrip(b"\r\n")
                    if value.strip():
                        collect.add(value, f"line {n}")
                    if not n & 0x3FFF:
                        bar.update(raw.tell() - bar.n)
                bar.update(size - bar.n)
        except (OSError, EOFError) as exc:  # a truncated or corrupt gzip stream
            raise TrainingError(f"cannot read {path} past line {collect.records}: {exc}") from None
    return collect.result({"kind": "file", "path": str(path.resolve()), "gzip": zipped,
                           "read_seconds": round(time.monotonic() - started, 1)}, str(path))


async def _read_topic(broker_url: str, topic: str, collect: _Collector, quiet: bool) -> dict:
    from aiokafka import AIOKafkaConsumer, TopicPartition

    from app import security
    from app.kafka.probes import read_true_ends
    from app.settings import bootstrap_servers as bootstrap

    servers = bootstrap(broker_url)
    consumer = AIOKafkaConsumer(bootstrap_servers=servers, enable_auto_commit=False,
                                auto_offset_reset="earliest", fetch_max_wait_ms=100,
                                **security.client_kwargs(servers))  # TLS / SASL as the worker's clients
    try:
        await consumer.start()
    except Exception as exc:
        raise TrainingError(f"cannot reach the broker at {broker_url}: {exc}") from None
    try:
        parts = consumer.partitions_for_topic(topic)
        for _ in range(10):
            if parts:
                break
            await consumer._client.force_metadata_update()
            parts = consumer.partitions_for_topic(topic)
            if not parts:
                await asyncio.sleep(0.2)
        if not parts:
            raise TrainingError(f"topic {topic!r} does not exist on {broker_url}")
        tps = [TopicPartition(topic, p) for p in sorted(parts)]
        starts = await consumer.beginning_offsets(tps)
        reported = await consumer.end_offsets(tps)
        # The end offsets taken now are where reading stops. Tansu reports a partition's end as the
        # start of its last record batch, so they are confirmed by reading past them (the worker's
        # table recovery does the same); on a topic still being written that probe would not settle,
        # and the reported ends are used (on Tansu: less at most the last batch per partition).
        try:
            ends = await asyncio.wait_for(read_true_ends(servers, dict(reported)), timeout=10)
            settled = True
        except asyncio.TimeoutError:
            ends, settled = dict(reported), False
        todo = {tp for tp in tps if ends[tp] > starts[tp]}
        total = sum(ends[tp] - starts[tp] for tp in tps)
        by_partition: dict[int, list] = {tp.partition: [] for tp in tps}
        if todo:
            consumer.assign(sorted(todo))
            await consumer.seek_to_beginning(*todo)
            with _bar(f"reading {topic}", total, "rec", quiet) as bar:
                idle = 0
                while todo:
                    batch = await consumer.getmany(timeout_ms=1000, max_records=20_000)
                    if not batch:
                        for tp in list(todo):
                            if await consumer.position(tp) >= ends[tp]:
                                todo.discard(tp)
                        idle += 1
                        if idle >= 15:  # the broker holds fewer records than it reported
                            raise TrainingError(f"topic {topic}: partitions {sorted(tp.partition for tp in todo)} "
                                                f"returned nothing before their end offsets")
                        continue
                    idle = 0
                    for tp, records in batch.items():
                        end = ends[tp]
                        kept = [r for r in records if r.offset < end]
                        by_partition[tp.partition].extend((r.offset, r.value) for r in kept)
                        bar.update(len(kept))
                        if (records and records[-1].offset + 1 >= end) or await consumer.position(tp) >= end:
                            todo.discard(tp)
                            consumer.pause(tp)
        # Partition number, then offset: ties in event time keep this order.
        for p in sorted(by_partition):
            for offset, value in by_partition[p]:
                collect.add(value, f"partition {p} offset {offset}")
        return {"kind": "topic", "topic": topic, "broker": broker_url, "ends_confirmed": settled,
                "partitions": {str(tp.partition): [starts[tp], ends[tp]] for tp in tps}}
    finally:
        await consumer.stop()


def read_topic(pipeline: str, topic: str, broker_url: str, since: int | None = None, until: int | None = None,
               quiet: bool = False) -> Recorded:
    """A topic's retained history, from the beginning to the end offsets taken at start."""
    started = time.monotonic()
    collect = _Collector(configured()[pipeline], since, until)
    source = asyncio.run(_read_topic(broker_url, topic, collect, quiet))
    return collect.result({**source, "read_seconds": round(time.monotonic() - started, 1)}, f"topic {topic}")


# -- labels -------------------------------------------------------------------------------------

def cart_keep(state: dict, event: dict) -> tuple[str, bool]:
    return state["session_id"], event["type"] == "purchase"


def cart_labels(kept: list) -> np.ndarray:
    """"This session buys later", as the simulator's label: an event is positive when its session
    (the session id of the serving state after it) has a purchase after it, counting to the
    session's first purchase: that purchase and what follows it in the session are negatives."""
    first: dict[str, int] = {}
    for i, k in enumerate(kept):
        if k is not None and k[1] and k[0] not in first:
            first[k[0]] = i
    return np.fromiter((k is not None and first.get(k[0], -1) > i for i, k in enumerate(kept)),
                       dtype=np.int8, count=len(kept))


def fraud_keep(state: dict, event: dict) -> str:
    return event["txn_id"]


@dataclass
class Labels:
    path: str
    values: dict[str, int]
    lines: int
    bad: int
    samples: list[str]


def read_labels(path: Path) -> Labels:
    """JSON Lines of {"txn_id": str, "label": 0 | 1} (true / false accepted); a later line for the
    same transaction overrides an earlier one (a review reversing a chargeback)."""
    path = Path(path)
    values: dict[str, int] = {}
    lines = bad = 0
    samples: list[str] = []
    try:
        raw = open(path, "rb")
    except OSError as exc:
        raise TrainingError(f"cannot read labels {path}: {exc.strerror or exc}") from None
    with raw:
        zipped = raw.read(2) == b"\x1f\x8b"
        raw.seek(0)
        stream = io.BufferedReader(gzip.GzipFile(fileobj=raw)) if zipped else raw
        for n, line in enumerate(stream, 1):
            if not line.strip():
                continue
            lines += 1
            try:
                obj = orjson.loads(line)
                if not isinstance(obj, dict):
                    raise ValueError("not a JSON object")
                txn_id, label = obj.get("txn_id"), obj.get("label")
                if not isinstance(txn_id, str) or not txn_id:
                    raise ValueError("'txn_id' must be a non-empty string")
                if label not in (0, 1) or isinstance(label, float):
                    raise ValueError(f"'label' must be 0 or 1, got {label!r}")
            except (orjson.JSONDecodeError, ValueError) as exc:
                bad += 1
                if len(samples) < SAMPLES:
                    samples.append(f"line {n}: {exc}")
                continue
            values[txn_id] = int(label)
    if not values:
        raise TrainingError(f"no valid label in {path} ({bad} bad line(s))")
    return Labels(str(path.resolve()), values, lines, bad, samples)


# -- the dataset --------------------------------------------------------------------------------

@dataclass
class Dataset:
    rows: np.ndarray     # feature rows of every valid event, replay order
    y: np.ndarray        # labels, same order
    use: np.ndarray      # rows that take part in training and evaluation
    failed: list         # (index, reason) of events the feature code rejected (dead letters online)
    labels: dict         # what the labels were and how many


def build(rec: Recorded, labels: Labels | None = None, labelled_only: bool = False, quiet: bool = False) -> Dataset:
    """Feature rows through the worker's code, and the labels."""
    pipe = configured()[rec.pipeline]
    keep = cart_keep if rec.pipeline == "cart" else fraud_keep
    with _bar("replaying through feature code", len(rec.raws), "ev", quiet) as bar:
        folded = fold(pipe, rec.raws, report=lambda done, total: bar.update(done - bar.n), keep=keep,
                      max_bytes=current().max_event_bytes)
    ok = np.ones(len(rec.raws), dtype=bool)
    for i, _ in folded.failed:
        ok[i] = False
    if rec.pipeline == "cart":
        y = cart_labels(folded.kept)
        info = {"kind": "session buys later (from the events)"}
        use = ok
    else:
        values = labels.values if labels else {}
        ids = folded.kept
        y = np.fromiter((values.get(t, 0) if t is not None else 0 for t in ids), dtype=np.int8, count=len(ids))
        labelled = np.fromiter((t in values for t in ids), dtype=bool, count=len(ids))
        use = ok & labelled if labelled_only else ok
        matched = int(labelled.sum())
        info = {"kind": "labels file" if labels else "none (every transaction negative)",
                "labelled_only": labelled_only, "transactions_labelled": matched,
                "positives": int(y[use].sum())}
        if labels:
            known = {t for t in ids if t is not None}
            info.update(path=labels.path, lines=labels.lines, bad=labels.bad, bad_samples=labels.samples,
                        unmatched=sum(1 for t in values if t not in known))
    return Dataset(folded.rows, y, use, folded.failed, info)


# -- training -----------------------------------------------------------------------------------

def _metrics(pipeline: str, y: np.ndarray, p: np.ndarray, p_base: np.ndarray) -> dict:
    m = {
        "auc_holdout": _round(roc_auc(y, p)),
        "pr_auc_holdout": _round(average_precision(y, p)),
        "auc_baseline_holdout": _round(roc_auc(y, p_base)),
        "pr_auc_baseline_holdout": _round(average_precision(y, p_base)),
    }
    if pipeline == "fraud":
        m["review"] = at_threshold(y, p, current().fraud_review_at)
        m["decline"] = at_threshold(y, p, current().fraud_decline_at)
        m["baseline_review"] = at_threshold(y, p_base, current().fraud_review_at)
        m["baseline_decline"] = at_threshold(y, p_base, current().fraud_decline_at)
    return m


def _round(v: float | None) -> float | None:
    return None if v is None else round(v, 4)


@dataclass
class Result:
    meta: dict
    current: bool          # the new version is the current model now
    previous: str | None   # version of the current model before, if any
    report_path: Path
    store_seconds: float   # writing the version, and as current model its native-code compile


def train(rec: Recorded, model_dir: Path, labels: Labels | None = None, labelled_only: bool = False,
          holdout: float = 0.2, rounds: int | None = None, promote_local: bool = False,
          quiet: bool = False) -> Result:
    """Train, evaluate and store one model from recorded events; see the module docstring."""
    start = time.monotonic()
    pipeline = rec.pipeline
    if not 0 < holdout < 1:
        raise TrainingError(f"--holdout must be between 0 and 1, got {holdout}")
    if pipeline == "cart" and (labels is not None or labelled_only):
        raise TrainingError("cart labels come from the events themselves: --labels and --labelled-only are for fraud")
    if labelled_only and labels is None:
        raise TrainingError("--labelled-only needs --labels")
    rounds = rounds or ROUNDS[pipeline]
    pipe = configured()[pipeline]
    names = list(pipe.feature_names)
    data = build(rec, labels, labelled_only, quiet)
    replayed = time.monotonic()
    X, y, ts = data.rows[data.use], data.y[data.use], rec.ts[data.use]
    if not len(y):
        raise TrainingError("no labelled transaction among the events: nothing to train on")
    train_mask, test_mask = split(ts, holdout)
    for part, mask in (("training", train_mask), ("held-out", test_mask)):
        if not mask.any():
            raise TrainingError(f"the {part} part is empty: the events span too little event time to split")
    if y[train_mask].min() == y[train_mask].max():
        raise TrainingError(f"every event of the training part is labelled {int(y[train_mask][0])}: "
                            f"nothing to learn" + (" (pass --labels)" if pipeline == "fraud" and labels is None else ""))
    base_names = list(BASELINE[pipeline])
    base_cols = [names.index(f) for f in base_names]
    print(f"training {pipeline} on {int(train_mask.sum()):,} events, holding out {int(test_mask.sum()):,} "
          f"(last {holdout:.0%} by event time); {rounds} rounds", file=sys.stderr, flush=True)
    model = fit(X[train_mask], y[train_mask], names, rounds)
    baseline = fit(X[train_mask][:, base_cols], y[train_mask], base_names, rounds)
    yt = y[test_mask]
    p = model.predict(X[test_mask])
    p_base = baseline.predict(X[test_mask][:, base_cols])
    fitted = time.monotonic()
    cut = int(ts[test_mask].min())
    metrics = {
        **_metrics(pipeline, yt, p, p_base),
        "baseline_features": base_names,
        "recency_features": [f for f in names if f not in base_names],
        "events_train": int(train_mask.sum()),
        "events_holdout": int(test_mask.sum()),
        "positives_train": int(y[train_mask].sum()),
        "positives_holdout": int(yt.sum()),
        "positive_rate": round(float(y.mean()), 4),
        "holdout": holdout,
        "holdout_from_ts": cut,
        "holdout_from": iso(cut),
    }
    source = {**rec.source, "features_failed": len(data.failed),
              "features_failed_samples": [f"event {i}: {r}" for i, r in data.failed[:SAMPLES]]}
    meta = {
        "pipeline": pipeline,
        "features": names,
        "metrics": metrics,
        "source": source,
        "window": window(ts),
        "labels": data.labels,
        "training": {"rounds": rounds, "events_used": int(len(y)),
                     "replay_seconds": round(replayed - start, 1), "fit_seconds": round(fitted - replayed, 1)},
        "trained_at": iso(time.time() * 1000),
    }
    pipeline_dir = Path(model_dir) / pipeline
    before = registry.current(pipeline_dir)
    previous = before["version"] if before else None
    version = registry.version_of(model.model_to_string())
    # The same model again (same data) rewrites its version's metadata; if it is the current model,
    # the current metadata too, so that the two never disagree.
    make_current = before is None or promote_local or previous == version
    meta["training"]["seconds"] = round(time.monotonic() - start, 1)
    html = report.render({**meta, "version": version}, yt, p, p_base, model.feature_importance("gain"))
    stored = time.monotonic()
    meta = write_model(pipeline_dir, model, meta, files={registry.REPORT: html}, current=make_current)
    return Result(meta, make_current, previous,
                  registry.version_dir(pipeline_dir, meta["version"]) / registry.REPORT,
                  round(time.monotonic() - stored, 1))


# -- what the command prints --------------------------------------------------------------------

def _f(v) -> str:
    return "   n/a" if v is None else f"{v:.4f}"


def summary(rec: Recorded, result: Result) -> list[str]:
    """The short table `scoring train` prints (the caller adds the version line)."""
    meta = result.meta
    src, m = meta["source"], meta["metrics"]
    where = src.get("path") or f"topic {src['topic']}"
    lines = [f"read {src['records']:,} records from {where}: {src['events']:,} valid events"
             + (f", {src['outside_window']:,} outside --since/--until" if src["outside_window"] else "")]
    if src["bad"]:
        lines.append(f"bad records: {src['bad']:,} (skipped; the worker would dead-letter them); first:")
        lines += [f"  {s}" for s in src["bad_samples"]]
    if src.get("features_failed"):
        lines.append(f"events the feature code rejected: {src['features_failed']:,} (skipped)")
        lines += [f"  {s}" for s in src["features_failed_samples"]]
    lab = meta["labels"]
    if meta["pipeline"] == "fraud":
        lines.append(f"labels: {lab['kind']}; {lab['transactions_labelled']:,} transactions labelled, "
                     f"{lab['positives']:,} positive among those used"
                     + (f"; {lab['bad']:,} bad label lines" if lab.get("bad") else "")
                     + (f"; {lab['unmatched']:,} labels match no transaction" if lab.get("unmatched") else "")
                     + ("; unlabelled transactions left out (--labelled-only)" if lab["labelled_only"] else ""))
    w = meta["window"]
    lines.append(f"event time {w['from']} .. {w['to']}; held out from {m['holdout_from']} "
                 f"({m['events_holdout']:,} events, {m['positives_holdout']:,} positive)")
    lines.append("")
    lines.append(f"{'held out':<22}{'AUC':>8}{'PR-AUC':>9}")
    lines.append(f"{'model':<22}{_f(m['auc_holdout']):>8}{_f(m['pr_auc_holdout']):>9}")
    lines.append(f"{'baseline':<22}{_f(m['auc_baseline_holdout']):>8}{_f(m['pr_auc_baseline_holdout']):>9}"
                 f"   (without recency; only {', '.join(m['baseline_features'])})")
    if meta["pipeline"] == "fraud":
        lines.append("")
        lines.append(f"{'threshold':<22}{'precision':>10}{'recall':>8}{'flagged':>9}   baseline precision/recall")
        for name in ("review", "decline"):
            t, b = m[name], m[f"baseline_{name}"]
            lines.append(f"{name + ' >= ' + str(t['threshold']):<22}{_f(t['precision']):>10}{_f(t['recall']):>8}"
                         f"{t['flagged']:>9,}   {_f(b['precision'])} / {_f(b['recall'])}")
    t = meta["training"]
    lines.append("")
    lines.append(f"took {src['read_seconds'] + t['seconds'] + result.store_seconds:.1f} s: reading "
                 f"{src['read_seconds']:.1f}, replaying through the feature code {t['replay_seconds']:.1f}, "
                 f"model + baseline ({t['rounds']} rounds each) {t['fit_seconds']:.1f}, evaluation and report "
                 f"{t['seconds'] - t['replay_seconds'] - t['fit_seconds']:.1f}, storing"
                 f"{' and compiling' if result.current else ''} {result.store_seconds:.1f}")
    lines.append(f"report: {result.report_path}")
    version = meta["version"]
    if result.current and result.previous in (None, version):
        lines.append(f"current model: {version}" + (" (there was none)" if result.previous is None else " (unchanged)"))
    elif result.current:
        lines.append(f"current model: {version} (was {result.previous}; workers load it at their next start)")
    else:
        lines.append(f"current model stays {result.previous}; this version is stored beside it "
                     f"(--promote-local makes a new one current)")
    return lines
