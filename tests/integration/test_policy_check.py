"""``tidegate policy check``: broken policy files, each answered with one line naming the path.

Every case is the shipped policy file with one mistake (or a small file of its own), run
through the real console script; none may exit 0, and the one line must name the dotted path
(and, for a typo, the name meant).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.support.procs import BIN
from workers.settings import DEFAULT_POLICY_FILE

pytestmark = pytest.mark.integration

SHIPPED = DEFAULT_POLICY_FILE.read_text()


def run(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / "tidegate"), *argv], capture_output=True, text=True,
                          timeout=60, env={**os.environ, **(env or {})})


def edit(old: str, new: str) -> str:
    assert old in SHIPPED, old
    return SHIPPED.replace(old, new, 1)


def plus(extra: str) -> str:
    return SHIPPED + "\n" + extra


# (the broken file, what its one line must say)
BROKEN = {
    # unknown sections and keys, at every level, with the name meant
    "section typo": (plus('[dependencys.inventory]\nurl = "http://x"\n'),
                     "[dependencys]: unknown section; did you mean 'dependencies'?"),
    "autoscaling typo": (plus("[autoscalling.payments]\nworker_concurrency = 2\n"),
                         "[autoscalling]: unknown section; did you mean 'autoscaling'?"),
    "backpressure typo": (plus("[backpresure]\nlow_watermark = 1\n"),
                          "[backpresure]: unknown section; did you mean 'backpressure'?"),
    "top-level key": ("foo = 1\n" + SHIPPED, "[foo]: unknown key"),
    "dependency key typo": (edit("timeout_ms = 80 ", "timout_ms = 80 "),
                            "[dependencies.payments.timout_ms]: unknown key; "
                            "did you mean 'timeout_ms'?"),
    "sub-table typo": (edit("[dependencies.payments.fallback]", "[dependencies.payments.fallbak]"),
                       "[dependencies.payments.fallbak]: unknown section; "
                       "did you mean 'fallback'?"),
    "sub-table key typo": (edit("max_concurrent = 20", "max_concurent = 20"),
                           "[dependencies.payments.bulkhead.max_concurent]: unknown key; "
                           "did you mean 'max_concurrent'?"),
    "breaker key typo": (plus("[dependencies.search.breaker]\nwindow = 10\n"),
                         "[dependencies.search.breaker.window]: unknown key; "
                         "did you mean 'window_s'?"),
    "autoscaling key typo": (edit("worker_concurrency = 20", "worker_concurency = 20"),
                             "[autoscaling.payments.worker_concurency]: unknown key; "
                             "did you mean 'worker_concurrency'?"),
    "backpressure key typo": (plus("[backpressure]\nlow_water = 5\n"),
                              "[backpressure.low_water]: unknown key; "
                              "did you mean 'low_watermark'?"),
    "app key typo": (plus('[app]\nincludes = ["shop.tasks"]\n'),
                     "[app.includes]: unknown key; did you mean 'include'?"),
    # sections that name a queue must name one that exists
    "autoscaling unknown queue": (plus("[autoscaling.nosuchqueue]\nworker_concurrency = 2\n"),
                                  "[autoscaling.nosuchqueue]: unknown queue"),
    "autoscaling queue typo": (edit("[autoscaling.payments]", "[autoscaling.paymnts]"),
                               "[autoscaling.paymnts]: unknown queue; did you mean 'payments'?"),
    "backpressure unknown queue": (plus("[backpressure.nosuchqueue]\nlow_watermark = 1\n"),
                                   "[backpressure.nosuchqueue]: unknown queue"),
    # wrong types
    "number as string": (edit("timeout_ms = 80 ", 'timeout_ms = "80" '),
                         "[dependencies.payments.timeout_ms]: input should be a valid number"),
    "bool as string": (edit("idempotent = false", 'idempotent = "no"'),
                       "[dependencies.payments.idempotent]: input should be a valid boolean"),
    "tasks not a list": (edit('tasks = ["payments.*"]', 'tasks = "payments.*"'),
                         "[dependencies.payments.tasks]: input should be a valid list"),
    "integer as float": (edit("max_concurrent = 20", "max_concurrent = 20.5"),
                         "[dependencies.payments.bulkhead.max_concurrent]: "
                         "input should be a valid integer"),
    "not a URL": (edit('url = "http://127.0.0.1:8101"', 'url = "ftp://127.0.0.1"'),
                  "[dependencies.payments.url]: must be an http(s) URL"),
    "URL missing": (edit('url = "http://127.0.0.1:8102"\n', ""),
                    "[dependencies.search.url]: required key missing"),
    "unknown fallback kind": (edit('kind = "graceful"', 'kind = "gracefull"'),
                              "[dependencies.payments.fallback.kind]: input should be"),
    "unknown timeout mode": (plus('[dependencies.search.timeout]\nmode = "kill"\n'),
                             "[dependencies.search.timeout.mode]: input should be"),
    "rate limit without rate": (plus("[dependencies.search.rate_limit]\nburst = 5\n"),
                                "[dependencies.search.rate_limit.rate_per_s]: "
                                "required key missing"),
    "scaling number as string": (edit("worker_concurrency = 50", 'worker_concurrency = "50"'),
                                 "[autoscaling.search.worker_concurrency]: "
                                 "input should be a valid integer"),
    "include not a list": (plus('[app]\ninclude = "shop.tasks"\n'),
                           "[app.include]: input should be a valid list"),
    "include not a module": (plus('[app]\ninclude = ["shop tasks"]\n'),
                             "[app.include.0]: not a module name"),
    "not a finite number": (edit("timeout_ms = 80 ", "timeout_ms = nan "),
                            "[dependencies.payments.timeout_ms]: input should be a finite number"),
    "dependency not a table": ("[dependencies]\npayments = 5\n",
                               "[dependencies.payments]: must be a table"),
    # values out of range or out of order
    "timeout over deadline": (edit("deadline_ms = 200", "deadline_ms = 50"),
                              "[dependencies.payments]: per-attempt timeout 0.08s exceeds"),
    "retry on a charge": (plus("[dependencies.payments.retry]\nmax_attempts = 3\n"),
                          "[dependencies.payments]: not idempotent"),
    "failure rate above 1": (plus("[dependencies.search.breaker]\nfailure_rate = 1.5\n"),
                             "[dependencies.search.breaker]: breaker failure_rate must be in "
                             "(0, 1]"),
    "negative ttl": (edit("ttl_s = 300", "ttl_s = -5"),
                     "[dependencies.pricing.fallback]: fallback ttl_s must be"),
    "zero max_deferrals": (edit('kind = "queue"', 'kind = "queue"\nmax_deferrals = 0'),
        "[dependencies.email.fallback]: fallback max_deferrals must be"),
    "watermarks inverted": (plus("[backpressure]\nlow_watermark = 500\nhigh_watermark = 100\n"),
                            "[backpressure]: high_watermark (100) must exceed low_watermark (500)"),
    "queue high below default low": (plus("[backpressure.search]\nhigh_watermark = 10\n"),
                                     "[backpressure.search]: high_watermark (10) must exceed"),
    "negative watermark": (plus("[backpressure]\nlow_watermark = -1\nhigh_watermark = 10\n"),
                           "[backpressure.low_watermark]: input should be greater than or equal"),
    "retry-after inverted": (plus("[backpressure]\nmin_retry_after_s = 10\n"
                                  "max_retry_after_s = 5\n"),
                             "[backpressure]: min_retry_after_s (10) exceeds max_retry_after_s"),
    "min workers over max": (plus("[autoscaling]\nmin_workers = 30\n"),
                             "[autoscaling]: min_workers must be an integer in "
                             "[0, max_workers=20]"),
    # not a policy file at all
    "no dependencies": ("# nothing here\n", "[dependencies]: no [dependencies.NAME] tables"),
    "not TOML": ("[dependencies.payments\n", "TIDEGATE_POLICY_FILE"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_broken_file_is_one_line_naming_the_path(tmp_path: Path, case: str):
    text, expected = BROKEN[case]
    path = tmp_path / "policy.toml"
    path.write_text(text)
    out = run("policy", "check", str(path))
    assert out.returncode == 2, (case, out)
    assert out.stdout == "", out.stdout
    assert out.stderr.count("\n") == 1, out.stderr
    assert expected in out.stderr, out.stderr
    assert "Traceback" not in out.stderr


def test_enough_broken_files():
    assert len(BROKEN) >= 30


@pytest.mark.parametrize("shipped", ["workers/policy.toml", "deploy/policy.compose.toml"])
def test_shipped_files_are_valid_and_every_number_is_marked(shipped: str):
    path = DEFAULT_POLICY_FILE.parents[1] / shipped
    out = run("policy", "check", str(path))
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert "valid" in lines[0] and "payments, search, email, default" in lines[0]
    rows = [line.split() for line in lines if line.startswith("    ")]
    assert rows and all(row[-1] in {"file", "default", "[backpressure]", "[autoscaling]",
                                    "[shedding]"}
                        for row in rows)
    # no age budget for a job without a deadline unless [shedding] names one
    assert ["shedding.max_age_s", "none", "default"] in rows
    start = next(i for i, x in enumerate(lines) if x.startswith("[dependencies.payments]"))
    assert lines[start + 2].split() == ["timeout_ms", "80", "file"]
    assert any(r[:1] == ["retry.max_attempts"] and r[-1] == "default" for r in rows)


def test_configured_file_is_the_default(tmp_path: Path):
    path = tmp_path / "p.toml"
    path.write_text(plus("[autoscalling.payments]\nworker_concurrency = 2\n"))
    out = run("policy", "check", env={"TIDEGATE_POLICY_FILE": str(path)})
    assert out.returncode == 2 and str(path) in out.stderr and "autoscalling" in out.stderr
    out = run("policy", "check", str(tmp_path / "missing.toml"))
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "missing.toml" in out.stderr
