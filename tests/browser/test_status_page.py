"""The status page in headless Chromium while load is pushed: the chart moves, an open breaker
and a shed storm show; a real worker's capacity and the countdown it holds are told apart from
what it runs."""

from __future__ import annotations

import shutil
import tempfile
import threading
import time
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, Counter

from resilience.breaker import CircuitBreaker
from resilience.policy import Policy, PolicyConfig
from resilience.stores import RedisStore
from tests.conftest import tidegate_env
from tests.support.exporter import Exporter, policy_with_autoscaling, with_adaptive_search
from tests.support.procs import wait_until
from workers.cluster_metrics import CounterMirror
from workers.latency_share import CONCURRENCY_KEY, publish_concurrency
from workers.topology import load_topology

pytestmark = [pytest.mark.browser, pytest.mark.integration]

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")


@pytest.fixture
def driver():
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        pytest.skip("Debian chromium/chromium-driver not installed (scripts/bootstrap.sh "
                    "installs them where apt-get can)")
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="tidegate-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
                 f"--user-data-dir={profile}", "--window-size=1400,1100"):
        options.add_argument(flag)
    browser = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    browser.set_page_load_timeout(30)
    yield browser
    browser.quit()
    shutil.rmtree(profile, ignore_errors=True)


@pytest.mark.parametrize("broker", ["redis"], indirect=True)
def test_status_page_shows_depth_moving_and_an_open_breaker(
        broker, policy_file, producer, state_redis, tmp_path, driver, artifacts, start_worker):
    from selenium.webdriver.common.by import By

    # A real payments worker running 3 threads, holding one charge whose countdown has not
    # ended: in flight 0 of capacity 3, one retry waiting (not "in flight 1" on an idle worker).
    payments_worker = start_worker("payments", ready=False, concurrency=3)

    # search runs under an adaptive limit: its card shows the limit the workers publish
    policy = with_adaptive_search(policy_with_autoscaling(policy_file, tmp_path), tmp_path)
    exporter = Exporter(tidegate_env(broker, policy), tmp_path, interval=0.3, ttl=0.1)
    state_redis.delete(CONCURRENCY_KEY)
    search = Policy(PolicyConfig.from_mapping(
        "search", load_topology(policy).dependency("search").policy))
    search.call(lambda: time.sleep(0.02))  # a latency baseline of >= 20 ms
    stop = threading.Event()
    registry = CollectorRegistry()
    sheds = Counter("tidegate_sheds", "x", ["priority"], registry=registry)
    calls = Counter("tidegate_calls", "x", ["dependency", "outcome"], registry=registry)
    retries = Counter("tidegate_retries", "x", ["dependency"], registry=registry)
    mirror = CounterMirror(state_redis, registry=registry)

    def push_load() -> None:
        """Search tasks arrive in bursts (depth climbs) while LOW work is being shed, until the
        test ends: the storm must still be on when the banner is checked, however slow the
        machine made the steps before (at most 400 tasks are enqueued)."""
        i = 0
        while not stop.is_set():
            for _ in range(4 if i < 400 else 0):
                producer.enqueue("search.index", [f"doc-{i}"], priority="low")
                i += 1
            sheds.labels(priority="low").inc(10)
            # payments' outcomes change over time, so its rates chart draws a moving line
            calls.labels(dependency="payments", outcome="success").inc(1 + i % 7)
            calls.labels(dependency="payments", outcome="failure").inc(i % 3)
            retries.labels(dependency="payments").inc(i % 2)
            mirror.flush()
            publish_concurrency(state_redis, {"search": search}, "browser-test:1")
            stop.wait(0.2)

    loader = threading.Thread(target=push_load, daemon=True)
    try:
        driver.get(exporter.url + "/")
        loader.start()

        def chart_points() -> set[str]:
            line = driver.find_element(By.CSS_SELECTOR, 'svg.chart[data-queue="search"] '
                                                        "polyline.ready")
            return {p.split(",")[1] for p in (line.get_attribute("points") or "").split()}

        # The chart has drawn the depth at several different heights: it is moving.
        wait_until(lambda: len(chart_points()) >= 4, 60, interval=0.3,
                   message="the search chart showing the depth change")
        ready = driver.find_element(By.CSS_SELECTOR,
                                    '.card[data-queue="search"] [data-figure="ready"] .v')
        wait_until(lambda: int(ready.text) > 0, 30, message="a non-zero ready figure")

        payments = driver.find_element(By.CSS_SELECTOR, '.breaker[data-dependency="payments"]')
        assert payments.get_attribute("data-state") == "closed"
        topology = load_topology(policy_file)
        cfg = PolicyConfig.from_mapping("payments",
                                        topology.dependency("payments").policy).breaker
        CircuitBreaker("payments", cfg, RedisStore(state_redis)).force_open(120)

        wait_until(lambda: driver.find_element(
            By.CSS_SELECTOR, '.breaker[data-dependency="payments"]'
        ).get_attribute("data-state") == "open", 30, interval=0.2,
            message="the payments breaker shown as open")
        banner = driver.find_element(By.ID, "banner")
        wait_until(lambda: banner.get_attribute("data-level") == "open", 30,
                   message="the banner turned to 'open'")
        text = driver.find_element(By.ID, "banner-text").text
        assert "BREAKER OPEN" in text and "payments" in text
        wait_until(lambda: "SHEDDING" in driver.find_element(By.ID, "banner-text").text, 30,
                   interval=0.2, message="the shed storm in the banner")
        # Big and red: the open tile's background is the alarm colour, not the card grey.
        tile = driver.find_element(By.CSS_SELECTOR, '.breaker[data-dependency="payments"]')
        assert tile.value_of_css_property("background-color") in (
            "rgba(218, 54, 51, 1)", "rgb(218, 54, 51)")
        search_tile = driver.find_element(By.CSS_SELECTOR, '.breaker[data-dependency="search"]')
        assert search_tile.get_attribute("data-state") == "closed"

        # Per dependency: rates over time and the breaker's history, on a time axis.
        rates = ('[data-dependency-card="payments"] svg[data-chart="dependency-rates"] '
                 "polyline.successes")

        def heights(selector: str) -> set[str]:
            line = driver.find_element(By.CSS_SELECTOR, selector)
            return {p.split(",")[1] for p in (line.get_attribute("points") or "").split()}

        wait_until(lambda: len(heights(rates)) >= 3, 30, interval=0.3,
                   message="payments' successes per second drawn over time")
        assert driver.find_elements(By.CSS_SELECTOR, '[data-dependency-card="payments"] '
                                                     "polyline.failures")
        strip = '[data-dependency-card="payments"] svg[data-breaker="payments"]'
        wait_until(lambda: {r.get_attribute("data-state") for r in driver.find_elements(
            By.CSS_SELECTOR, f"{strip} rect")} >= {"closed", "open"}, 30, interval=0.3,
            message="the payments breaker history showing closed, then open")
        axis = [t.text for t in driver.find_elements(
            By.CSS_SELECTOR, 'svg.chart[data-queue="search"] text.axis')]
        assert axis[-1] == "now" and axis[0].startswith("-"), axis
        legend = driver.find_element(By.CSS_SELECTOR, '.card[data-queue="search"] .legend').text
        assert "retries waiting" in legend and "ready" in legend
        assert driver.find_elements(By.CSS_SELECTOR, 'svg[data-chart="queue-workers"]'
                                                     '[data-of="search"] polyline.live_workers')
        workers = driver.find_element(By.CSS_SELECTOR,
                                      '.card[data-queue="search"] [data-figure="workers"] .v')
        assert "/" in workers.text
        assert len(chart_points()) >= 4

        # in flight vs capacity, the held countdown apart; desired vs running workers
        payments_worker.wait_ready()
        producer.app.send_task("payments.charge", ["acct-held", 100], queue="payments",
                               countdown=300)
        card = '.card[data-queue="payments"]'

        def figure(key: str) -> str:
            return driver.find_element(By.CSS_SELECTOR,
                                       f'{card} [data-figure="{key}"] .v').text

        wait_until(lambda: figure("delayed") == "1" and figure("in_flight") == "0/3", 30,
                   interval=0.3, message="payments: in flight 0/3 and one retry waiting")
        load = f'{card} svg[data-chart="queue-load"]'
        workers_chart = f'{card} svg[data-chart="queue-workers"]'

        def panels() -> bool:
            """Read in one go (the page redraws every second: an element may go stale)."""
            legends = [e.text for e in driver.find_elements(By.CSS_SELECTOR, f"{card} .legend")]
            assert figure("workers").startswith("1/"), figure("workers")
            assert heights(f"{load} polyline.capacity"), "capacity not drawn"
            assert float(driver.find_element(By.CSS_SELECTOR, load).get_attribute(
                "data-max")) >= 3
            assert driver.find_element(By.CSS_SELECTOR, f"{load} polyline.in_flight")
            assert any("in flight" in t and "capacity" in t for t in legends), legends
            assert any("desired workers" in t and "running workers" in t for t in legends)
            for line in ("desired", "live_workers"):
                assert driver.find_element(By.CSS_SELECTOR, f"{workers_chart} polyline.{line}")
            return True

        wait_until(panels, 15, interval=0.3, message="payments' load and workers panels")
        # the same two figures for Prometheus
        samples = exporter.samples()
        payments = (("queue", "payments"),)
        assert samples[("tidegate_queue_capacity_tasks", payments)] == 3
        assert samples[("tidegate_queue_held_retries_messages", payments)] == 1
        # the adaptive limit: one line on search's card, none on payments' (static bulkhead)
        limit = '[data-dependency-card="search"] [data-concurrency="search"]'
        wait_until(lambda: driver.find_element(By.CSS_SELECTOR, limit).get_attribute(
            "data-limit") == "6", 30, interval=0.3, message="search's adaptive limit shown")
        text = driver.find_element(By.CSS_SELECTOR, limit).text
        assert "adaptive limit 6" in text and "in flight 0" in text and "1 process" in text
        assert "baseline" in text and " ms" in text, text
        assert not driver.find_elements(By.CSS_SELECTOR, '[data-concurrency="payments"]')
        driver.save_screenshot(str(artifacts / "status_page.png"))
        assert (artifacts / "status_page.png").stat().st_size > 10_000
    finally:
        stop.set()
        loader.join(10)
        exporter.stop()
