#!/usr/bin/env bash
# `make run`: the whole pipeline on this machine, in the foreground (Ctrl-C stops it all).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
export PATH="$PWD/$BIN:$PATH"
busy=""
for port in 4566 8000 8101 8102 8103 8104 9808; do
  (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && busy="$busy $port"
done
if [ -n "$busy" ]; then
  echo "run: ports already in use:$busy (is another 'make run' going?)" >&2
  exit 1
fi
procs=$(grep -cE '^[a-z_]+:' Procfile)
cat <<MSG
Tidegate: starting $procs processes from the Procfile (settings in deploy/local.env).
  broker + shared state  redis://127.0.0.1:6379 (db 0 and 1)
  SQS endpoint (moto)    http://127.0.0.1:4566
  simulators             payments :8101  search :8102  email :8103  pricing :8104
                         switch one:  curl -XPOST 127.0.0.1:8103/control -H 'content-type: application/json' -d '{"mode":"down"}'
                         its ledger:  curl 127.0.0.1:8103/ledger
  workers                one per queue: payments, search, email, default
  feeder                 2 mixed jobs/s through the Producer
  HTTP API               http://127.0.0.1:8000/docs   (bearer token: local-dev-token)
                         curl -H 'authorization: Bearer local-dev-token' -H 'content-type: application/json' \
                              -d '{"task":"search.index","args":["doc-1"],"priority":"high"}' 127.0.0.1:8000/v1/jobs
  status page, metrics   http://127.0.0.1:9808/   and   http://127.0.0.1:9808/metrics
  replayer               drains SQS-deferred email jobs once the email simulator is back
  queue depth            .venv/bin/tidegate depth --watch   (in another terminal, same env: deploy/local.env)
Ctrl-C stops everything.
MSG
if [ "$(id -u)" = 0 ]; then
  echo "note: running as root; Celery's superuser warning is silenced in the workers (deploy/local.env)"
fi
exec "$BIN/honcho" start -e deploy/local.env -f Procfile
