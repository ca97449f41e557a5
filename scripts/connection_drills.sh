#!/usr/bin/env bash
# Run the RabbitMQ connection-loss drill N times in a row (default 20) and print each run's
# accounting line, then a summary; exits 1 if any run failed. POOL=threads|prefork (threads).
# Uses TIDEGATE_TEST_SLOT like the tests (the drill closes only that slot's vhost connections).
set -u
runs=${1:-20}
pool=${POOL:-threads}
cd "$(dirname "$0")/.."
failed=0
for i in $(seq 1 "$runs"); do
  out=$(.venv/bin/pytest -p no:xdist -q -s -p no:cacheprovider \
        "tests/drills/test_connection_loss.py::test_worker_consumes_on_after_connection_closes[$pool]" 2>&1)
  status=$?
  line=$(grep -m1 -o "$pool: closes.*" <<<"$out" || true)
  if [ $status -eq 0 ]; then
    echo "run $i/$runs ok: $line"
  else
    failed=$((failed + 1))
    echo "run $i/$runs FAILED: ${line:-$(grep -m1 -E '^E ' <<<"$out")}"
  fi
done
echo "$((runs - failed))/$runs connection-loss drills passed ($pool)"
[ $failed -eq 0 ]
