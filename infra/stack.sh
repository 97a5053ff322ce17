#!/usr/bin/env bash
# Local development stack: Prefect server (UI at http://127.0.0.1:4200), an S3-compatible
# endpoint (moto_server, in memory) on 127.0.0.1:9000 with bucket "layerquant", the process work
# pool "layerquant-pool" and one worker. Everything binds to loopback.
#   infra/stack.sh start | stop | status        then: source .layerquant/stack/env
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
state="$repo/.layerquant/stack"
bin="$repo/.venv/bin"
mkdir -p "$state"
export PREFECT_HOME="$state/prefect" PREFECT_SERVER_ANALYTICS_ENABLED=false
export PREFECT_API_URL=http://127.0.0.1:4200/api PREFECT_WORKER_QUERY_SECONDS=5
export AWS_ENDPOINT_URL=http://127.0.0.1:9000 AWS_ACCESS_KEY_ID=layerquant AWS_SECRET_ACCESS_KEY=layerquant-dev AWS_DEFAULT_REGION=us-east-1

wait_for() {  # url seconds
  for _ in $(seq "$2"); do curl -fs "$1" >/dev/null 2>&1 && return 0; sleep 1; done
  echo "timed out waiting for $1" >&2; return 1
}

launch() {  # name command...: own session, pid file = session id, so stop() reaches its children too
  local name=$1; shift
  setsid bash -c 'echo $$ >"$0"; exec "$@"' "$state/$name.pid" "$@" >"$state/$name.log" 2>&1 &
  for _ in $(seq 20); do [ -s "$state/$name.pid" ] && return 0; sleep 0.1; done
}

start() {
  launch server "$bin/prefect" server start --host 127.0.0.1 --port 4200
  launch s3 "$bin/moto_server" -H 127.0.0.1 -p 9000
  wait_for http://127.0.0.1:9000/ 30
  "$bin/python" -c "import boto3; boto3.client('s3').create_bucket(Bucket='layerquant')"
  wait_for "$PREFECT_API_URL/health" 90
  "$bin/prefect" work-pool create layerquant-pool --type process >/dev/null 2>&1 || true
  (cd "$repo" && LAYERQUANT_REPO="$repo" launch worker "$bin/prefect" worker start --pool layerquant-pool)
  cat >"$state/env" <<ENV
export PREFECT_API_URL=$PREFECT_API_URL
export AWS_ENDPOINT_URL=$AWS_ENDPOINT_URL AWS_ACCESS_KEY_ID=$AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY=$AWS_SECRET_ACCESS_KEY AWS_DEFAULT_REGION=$AWS_DEFAULT_REGION
export LAYERQUANT_REPO=$repo
ENV
  echo "stack up: UI http://127.0.0.1:4200, S3 s3://layerquant at $AWS_ENDPOINT_URL; source $state/env"
}

stop() {
  for name in worker server s3; do
    pid_file="$state/$name.pid"
    [ -f "$pid_file" ] || continue
    pid=$(cat "$pid_file")
    # a worker ignores one SIGTERM; SIGINT twice stops it, SIGKILL if it still lingers
    for sig in INT INT TERM KILL; do
      kill -0 "$pid" 2>/dev/null || break
      kill "-$sig" -- "-$pid" 2>/dev/null || kill "-$sig" "$pid" 2>/dev/null || true
      sleep 2
    done
    rm -f "$pid_file"
  done
  echo "stack stopped"
}

status() {
  for name in server s3 worker; do
    pid_file="$state/$name.pid"
    if [ -f "$pid_file" ] && kill -0 "$(cat "$pid_file")" 2>/dev/null; then echo "$name: running"; else echo "$name: stopped"; fi
  done
}

case "${1:-}" in
  start) start ;; stop) stop ;; status) status ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
