#!/usr/bin/env bash
# A local Dask cluster beside the stack of infra/stack.sh: one scheduler on 127.0.0.1:8786 and N
# worker processes (one thread each), which runs reach with --dask-address tcp://127.0.0.1:8786.
# The workers read the model folder and the store like the flow does: start this after
# `source .layerquant/stack/env` so they get the same PREFECT_API_URL and AWS_* settings.
#   infra/dask_stack.sh start [N=2] | stop | status
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
state="$repo/.layerquant/dask"
bin="$repo/.venv/bin"
mkdir -p "$state"
# Dask's sampling profiler walks every thread's frames and trips over the greenlets a shard's
# paused forwards live in (tracebacks in the worker logs); a run needs none of its output
export DASK_DISTRIBUTED__WORKER__PROFILE__ENABLED=False
# one torch thread per worker process: parallelism comes from the workers
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
# two malloc arenas (infra/memory.py ARENA_MAX): freed buffers are reused across the worker's
# threads instead of kept per thread
export MALLOC_ARENA_MAX=2

launch() {  # name command...: own session, pid file = session id, so stop() reaches its children too
  local name=$1; shift
  setsid bash -c 'echo $$ >"$0"; exec "$@"' "$state/$name.pid" "$@" >"$state/$name.log" 2>&1 &
  for _ in $(seq 20); do [ -s "$state/$name.pid" ] && return 0; sleep 0.1; done
}

start() {
  local n=${1:-2}
  launch scheduler "$bin/dask" scheduler --host 127.0.0.1 --port 8786 --dashboard-address 127.0.0.1:8787
  for _ in $(seq 30); do "$bin/python" -c "import socket; socket.create_connection(('127.0.0.1', 8786), 1)" 2>/dev/null && break; sleep 1; done
  # --nworkers: one nanny per worker, which restarts a worker that dies (a SIGKILL, OOM)
  (cd "$repo" && launch workers "$bin/dask" worker tcp://127.0.0.1:8786 --nworkers "$n" --nthreads 1 \
      --memory-limit 0 --host 127.0.0.1)
  echo "dask up: scheduler tcp://127.0.0.1:8786 (dashboard http://127.0.0.1:8787), $n workers;" \
       "run: layerquant quantize --dask-address tcp://127.0.0.1:8786 ..."
}

stop() {
  for name in workers scheduler; do
    pid_file="$state/$name.pid"
    [ -f "$pid_file" ] || continue
    pid=$(cat "$pid_file")
    for sig in TERM TERM KILL; do
      kill -0 "$pid" 2>/dev/null || break
      kill "-$sig" -- "-$pid" 2>/dev/null || kill "-$sig" "$pid" 2>/dev/null || true
      sleep 2
    done
    rm -f "$pid_file"
  done
  echo "dask stopped"
}

status() {
  for name in scheduler workers; do
    pid_file="$state/$name.pid"
    if [ -f "$pid_file" ] && kill -0 "$(cat "$pid_file")" 2>/dev/null; then echo "$name: running"; else echo "$name: stopped"; fi
  done
}

case "${1:-}" in
  start) start "${2:-2}" ;;
  stop) stop ;;
  status) status ;;
  *) echo "usage: $0 start [N] | stop | status" >&2; exit 2 ;;
esac
