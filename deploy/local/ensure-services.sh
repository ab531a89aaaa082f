#!/usr/bin/env bash
# Make sure PostgreSQL, Redis and RabbitMQ answer on their standard local
# ports: use them when up, start them when installed but down, and fail
# loudly when one is missing. Used by `make test`.
set -u

wait_for() {  # name, check command, seconds
  local name=$1 check=$2 limit=$3
  for _ in $(seq 1 "$limit"); do
    if eval "$check" >/dev/null 2>&1; then echo "ok: $name is up"; return 0; fi
    sleep 1
  done
  echo "FAIL: $name did not come up within ${limit}s" >&2
  return 1
}

need() {  # name, binary
  if ! command -v "$2" >/dev/null 2>&1; then
    echo "FAIL: $1 is not installed (no '$2' on PATH); the integration tests need a real $1." >&2
    exit 1
  fi
}

pg_up='pg_isready -h 127.0.0.1 -p 5432 -q'
redis_up='[ "$(redis-cli -h 127.0.0.1 -p 6379 ping)" = PONG ]'
rabbit_up='timeout 2 bash -c "exec 3<>/dev/tcp/127.0.0.1/5672"'

need PostgreSQL pg_isready
if ! eval "$pg_up"; then
  need PostgreSQL pg_ctlcluster
  echo "starting PostgreSQL"
  pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n 1)" main start
fi
wait_for PostgreSQL "$pg_up" 60 || exit 1

need Redis redis-server
if ! eval "$redis_up"; then
  echo "starting Redis"
  mkdir -p /var/lib/redis /var/log/redis
  redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
    --dir /var/lib/redis --logfile /var/log/redis/ci.log
fi
wait_for Redis "$redis_up" 30 || exit 1

need RabbitMQ rabbitmq-server
if ! eval "$rabbit_up"; then
  echo "starting RabbitMQ"
  rabbitmq-server -detached
fi
wait_for RabbitMQ "$rabbit_up" 120 || exit 1
# The port opens before the broker is ready to take vhosts and users.
wait_for "RabbitMQ application" "rabbitmqctl -q await_startup" 120 || exit 1
