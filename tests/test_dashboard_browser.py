"""The dashboard in a real browser (Debian's chromium, driven by Playwright) while events flow."""
from __future__ import annotations

import asyncio
import random
import threading
import time
from pathlib import Path

import orjson
import pytest
from aiokafka import AIOKafkaProducer

from tests.harness import partition_as_producers_do, produce, produce_events, read_json

pytestmark = pytest.mark.browser

CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ARTIFACT = Path(__file__).resolve().parent.parent / "test-artifacts" / "dashboard.png"
TOKEN = "dash-token"
TYPES = ("page_view", "product_view", "product_view", "add_to_cart", "remove_from_cart", "checkout_start", "purchase")


def event(rng: random.Random, n: int, user: str) -> dict:
    kind = rng.choice(TYPES)
    e = {"event_id": f"dash-{n}", "user_id": user, "ts": int(time.time() * 1000), "type": kind,
         "category": rng.choice(("books", "games", "garden")), "price": round(rng.uniform(1, 80), 2),
         "quantity": rng.randint(1, 3)}
    if kind != "page_view":
        e["product_id"] = f"p{rng.randint(1, 50)}"
    return e


class Traffic(threading.Thread):
    """Cart events at about `rate` per second until stopped (its own event loop, in a thread)."""

    def __init__(self, bootstrap: str, rate: float = 80.0) -> None:
        super().__init__(daemon=True)
        self.bootstrap, self.rate = bootstrap, rate
        self.stopping = threading.Event()
        self.sent = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            asyncio.run(self._run())
        except BaseException as exc:  # surfaced by the test
            self.error = exc

    async def _run(self) -> None:
        rng = random.Random(3)
        producer = AIOKafkaProducer(bootstrap_servers=self.bootstrap, linger_ms=5)
        await producer.start()
        try:
            start = time.monotonic()
            while not self.stopping.is_set():
                user = f"dash-u{rng.randint(0, 29)}"
                await producer.send("cart_events", orjson.dumps(event(rng, self.sent, user)), key=user.encode(),
                                    partition=partition_as_producers_do(user.encode()))
                self.sent += 1
                ahead = self.sent / self.rate - (time.monotonic() - start)
                if ahead > 0:
                    await asyncio.sleep(ahead)
            await producer.flush()
        finally:
            await producer.stop()


def test_dashboard_shows_live_data(broker, workers, tmp_path):
    if not CHROMIUM.exists():
        pytest.fail("Debian chromium is missing: run `make browser` (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    from tests.test_models_live import cli, model_dir_with_another, models_of
    from tests.test_web import wait_until

    model_dir, _, challenger = model_dir_with_another(tmp_path, "cart")
    w = workers("w1", env={"WEB_TOKEN": TOKEN, "MODEL_DIR": str(model_dir)})
    cli("models", "shadow", "cart", challenger, env={"BROKER_URL": broker.url, "MODEL_DIR": str(model_dir)})
    first = event(random.Random(1), 0, "dash-lookup")
    first["event_id"] = "dash-lookup-0"
    produce_events(broker, "cart_events", [first], "user_id")
    asyncio.run(produce(broker, "cart_events", [(b"dash-bad", b"{oops")]))  # one dead letter to show
    read_json(broker, "personalization_scores", 1)
    wait_until(lambda: (models_of(w, TOKEN)["cart"]["challenger"] or {}).get("version") == challenger, 60,
               "the challenger in shadow")

    traffic = Traffic(broker.bootstrap)
    traffic.start()
    problems: list[str] = []
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=ARGS, headless=True)
            try:
                page = browser.new_page(viewport={"width": 1280, "height": 900})
                page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}")
                        if m.type in ("error", "warning") else None)
                page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
                page.on("requestfailed", lambda r: problems.append(f"request failed: {r.url} {r.failure}"))

                # the page itself needs no token; it asks for one before its first data call
                response = page.goto(w.url + "/dashboard")
                assert response.status == 200
                page.wait_for_selector("#tokenBox", state="visible", timeout=10_000)
                page.fill("#tokenInput", TOKEN)
                page.press("#tokenInput", "Enter")
                page.wait_for_selector("#tokenBox", state="hidden", timeout=10_000)

                # live numbers: throughput from two samples, latency, the charts
                page.wait_for_function(
                    "() => parseFloat(document.getElementById('rateIn').textContent) > 0"
                    " && parseFloat(document.getElementById('rateScored').textContent) > 0", timeout=30_000)
                page.wait_for_function("() => document.getElementById('p99').textContent !== '–'", timeout=30_000)
                # a few refreshes, so the charts have a line to show
                page.wait_for_function(
                    "() => { const l = document.querySelector('#rateChart polyline');"
                    " return l && l.getAttribute('points').split(' ').length >= 4; }", timeout=30_000)
                assert page.text_content("#worker") == w.url
                assert page.text_content("#ready") == "ready"
                assert page.locator("#scoreChart-cart rect").count() == 10
                assert page.locator("#owners a").first.text_content() == w.url
                lag_rows = page.locator("#lagGrid tr").all_text_contents()
                assert any(r.startswith("cart_events") for r in lag_rows), lag_rows
                assert page.locator("#owners th").all_text_contents()[:2] == ["worker", "cart_events"]
                assert "cart model" in page.text_content("#models")
                # champion and challenger side by side
                page.wait_for_function(
                    "() => document.querySelectorAll('#shadowChart-cart-challenger rect').length === 10", timeout=30_000)
                assert f"challenger {challenger} in shadow" in page.text_content("#models-cart")
                assert page.locator("#shadowChart-cart-champion rect").count() == 10
                page.wait_for_function("() => document.getElementById('deadTotal').textContent === '1'",
                                       timeout=30_000)
                assert page.locator("#deadChart rect").count() == 1
                assert "decode" in page.text_content("#deadRecent")

                # user lookup: the session and recent scores
                page.fill("#userId", "dash-lookup")
                page.click("#lookupBtn")
                page.wait_for_selector("#lookupWho", timeout=10_000)
                who = page.text_content("#lookupWho")
                assert "user dash-lookup" in who and "session dash-lookup:" in who
                assert "Session state" in page.text_content("#lookupResult")
                assert "Recent scores" in page.text_content("#lookupResult")

                ARTIFACT.parent.mkdir(parents=True, exist_ok=True)
                page.screenshot(path=str(ARTIFACT), full_page=True)
            finally:
                browser.close()
    finally:
        traffic.stopping.set()
        traffic.join(10)
    assert traffic.error is None, traffic.error
    assert traffic.sent > 50
    assert not problems, problems
    assert ARTIFACT.stat().st_size > 10_000
