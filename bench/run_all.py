"""Run every benchmark and write bench/RESULTS.md (``make bench``).

Each benchmark prints its own table with ratios against a baseline measured in the same run;
this runner only collects that output, so a benchmark stays runnable on its own. Absolute
times on a shared machine are noise: read the ratios.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

# (script, arguments, what it measures). Order: cheapest first.
BENCHMARKS: list[tuple[str, list[str], str]] = [
    ("retry_storm.py", [], "Retry storm: retries per 100 ms with and without jitter, budget cap"),
    ("guard_overhead.py", ["--calls", "5000"], "Guard overhead: success-path cost per call"),
    ("pipeline_throughput.py", [], "Pipeline throughput: Tidegate vs bare Celery"),
    ("enqueue.py", [], "Enqueue throughput: single and batch enqueue vs a send_task loop"),
    ("state_load.py", [], "State and broker load: Redis commands, bytes and AMQP frames per job, "
     "per guarded call and per polling process (docs/scaling.md)"),
    ("bulkhead_isolation.py", [], "Bulkhead isolation: search while payments hangs"),
    ("backpressure.py", [], "Backpressure and overload: naive producer vs Tidegate"),
    ("replay.py", [], "Replay: queue-for-later drain vs raw SQS receive+delete"),
    ("api_overload.py", [], "API overload: answers by status at 3x capacity vs a 503 floor"),
    ("hedging.py", [], "Hedged reads: p99 against a 5% tail 10x slower, with and without"),
    ("adaptive_limit.py", [], "Adaptive limit vs static bulkheads while capacity changes"),
    ("adaptive_limit.py", ["--processes", "3"],
     "Adaptive limit across worker processes: each alone vs one limiter for all"),
]


def run(script: str, args: list[str], timeout: float) -> tuple[int, str, float]:
    started = time.monotonic()
    try:
        out = subprocess.run([sys.executable, str(HERE / script), *args], cwd=ROOT,
                             capture_output=True, text=True, timeout=timeout,
                             env={**os.environ, "PYTHONPATH": str(ROOT)})
        text = out.stdout + (f"\n[stderr]\n{out.stderr[-3000:]}" if out.returncode else "")
        return out.returncode, text.rstrip(), time.monotonic() - started
    except subprocess.TimeoutExpired as exc:
        partial = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        return 124, f"{partial}\n(timed out after {timeout:.0f} s)", time.monotonic() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", nargs="*", help="run only these scripts")
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument("--out", type=Path, default=HERE / "RESULTS.md")
    args = parser.parse_args()
    sections, failed = [], []
    for script, script_args, title in BENCHMARKS:
        if args.only and script not in args.only:
            continue
        if not (HERE / script).exists():
            sections.append(f"## {title}\n\n`bench/{script}` is not written yet.\n")
            failed.append(script)
            continue
        print(f"bench: {script} ...", flush=True)
        code, text, took = run(script, script_args, args.timeout)
        print(text, flush=True)
        status = "" if code == 0 else f" — **exit {code}**"
        if code:
            failed.append(script)
        command = " ".join([".venv/bin/python", f"bench/{script}", *script_args])
        sections.append(f"## {title}\n\n`{command}` ({took:.0f} s){status}\n\n```\n{text}\n```\n")
    header = (
        "# Benchmark results\n\n"
        f"Written by `make bench` on {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC, "
        f"Python {platform.python_version()}, {os.cpu_count()} cores, shared machine. "
        "Every figure is a ratio against a baseline run side by side in the same run; "
        "absolute times here are noise.\n"
    )
    args.out.write_text("\n".join([header, *sections]))
    print(f"bench: wrote {args.out}" + (f"; failed or missing: {', '.join(failed)}" if failed
                                         else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
