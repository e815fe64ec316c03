#!/usr/bin/env bash
# Proof that Shortcut scales out behind a real load balancer, with podman (`make scale-smoke`), using
# deploy/compose.scale.yml: three api replicas, HAProxy (deploy/haproxy/haproxy.cfg) and Prometheus.
#   images      podman + local stand-ins for python:3.11-slim / prom/prometheus / haproxy:lts
#   build       the Dockerfile (torch from this machine's local wheel folder when there is one)
#   up          `podman-compose -f deploy/compose.scale.yml up -d`: api1..api3, lb, prometheus
#   ready       every replica answers /ready, HAProxy's health checks have all three UP
#   balanced    60 concurrent streaming clients through HAProxy for 20 s: 0 errors, and every replica served a
#               share by its own /metrics; the aggregate tokens/s with 3 replicas
#   sse         one stream through HAProxy arrives token by token (the first token long before the last)
#   prometheus  Prometheus scrapes each replica (3 targets up, each with tokens) and the balancer
#   steering    a named steering vector made through HAProxy is read and used by name (intervention.add) on every
#               replica (one shared volume, SHORTCUT_STEERING_DIR); deleted through HAProxy, it is gone everywhere
#   stop        SIGTERM (podman stop) to api1 with requests in flight on it: 0 failures among requests started
#               after the stop, its in-flight requests finish with 200, it exits 0
#   kill        SIGKILL to api2 under load: only its in-flight requests fail, new ones succeed (HAProxy retries
#               refused connections and empty responses elsewhere, and marks it down within its check interval)
#   single      api2 stopped too: the same load as `balanced` on api3 alone; the 1-replica tokens/s
#   teardown    `podman-compose down -v`, nothing of the project left
# One PASS/FAIL line per step; exit 0 only if all pass. Logs and the measured figures (three.json, one.json) go to
# $SMOKE_LOG_DIR (default: a temp folder).
#
# Knobs: SMOKE_PROJECT (shortcut-scale), SMOKE_IMAGE (localhost/shortcut-api:scale-smoke), SMOKE_API_PORT (8000),
# SMOKE_STATS_PORT (8404), SMOKE_PROM_PORT (9090), SMOKE_WHEELS, SMOKE_SKIP_BUILD=1, SMOKE_KEEP=1,
# SMOKE_START_TIMEOUT (300 s), SMOKE_CLIENTS (60), SMOKE_SECONDS (20), SMOKE_TOKENS (48).
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT" || exit 1
PROJECT=${SMOKE_PROJECT:-shortcut-scale}
IMAGE=${SMOKE_IMAGE:-localhost/shortcut-api:scale-smoke}
CHECKPOINT=model/checkpoints/shakespeare.safetensors
COMPOSE_FILE="$ROOT/deploy/compose.scale.yml"
START_TIMEOUT=${SMOKE_START_TIMEOUT:-300}
CLIENTS=${SMOKE_CLIENTS:-60}
SECONDS_LOAD=${SMOKE_SECONDS:-20}
TOKENS=${SMOKE_TOKENS:-48}
LOG_DIR=${SMOKE_LOG_DIR:-$(mktemp -d /tmp/scale-smoke.XXXXXX)}
mkdir -p "$LOG_DIR"
PY=$(command -v python3 || command -v python)
CLIENT=("$PY" "$ROOT/deploy/scale_client.py")
REPLICAS=(api1 api2 api3)

# Settings come from compose.scale.yml's defaults, not from whatever this shell exports.
for v in $(compgen -e | grep -E '^(SHORTCUT_|PROMETHEUS_|HAPROXY_)' || true); do unset "$v"; done
export SHORTCUT_IMAGE=$IMAGE

STEPS=(images build up ready balanced sse prometheus steering stop kill single teardown)
source "$ROOT/deploy/smoke-lib.sh"

compose() { podman-compose -p "$PROJECT" -f "$COMPOSE_FILE" "$@"; }
project_containers() { podman ps -a -q --filter "label=io.podman.compose.project=$PROJECT"; }
container_of() { podman ps -a -q --filter "label=io.podman.compose.project=$PROJECT" --filter "label=com.docker.compose.service=$1" | head -n1; }
replica_url() { echo "http://$(podman inspect --format '{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}' "$(container_of "$1")"):8000"; }
replica_args() { local r; for r in "$@"; do printf -- '--replica %s=%s ' "$r" "$(replica_url "$r")"; done; }
dump_logs() { local s c; for s in "$@"; do c=$(container_of "$s"); [ -n "$c" ] && { echo "  | --- $s"; podman logs --tail 15 "$c" 2>&1 | sed 's/^/  | /'; }; done; }
figure() { "$PY" -c "import json,sys; print(round(json.load(open(sys.argv[1]))[sys.argv[2]]))" "$1" "$2" 2>/dev/null || echo "?"; }

teardown() {
  [ "${SMOKE_KEEP:-0}" = 1 ] && { log "SMOKE_KEEP=1: stack left up (project $PROJECT)"; pass teardown "kept"; return; }
  local c
  for c in $(project_containers); do podman logs "$c" >"$LOG_DIR/$(podman inspect --format '{{.Name}}' "$c").log" 2>&1; done
  compose down -v >"$LOG_DIR/down.log" 2>&1
  podman network rm -f "${PROJECT}_default" >>"$LOG_DIR/down.log" 2>&1 || true  # podman-compose 1.0.3 leaves it
  local left
  left=$(project_containers | wc -l)
  left=$(( left + $(podman volume ls -q --filter "label=io.podman.compose.project=$PROJECT" | wc -l) ))
  left=$(( left + $(podman network ls -q --filter "name=^${PROJECT}_" | wc -l) ))
  if [ "$left" -eq 0 ]; then pass teardown; else fail teardown "$left containers/volumes/networks of $PROJECT left (see $LOG_DIR/down.log)"; fi
}

summary() {
  [ -n "${RESULT[teardown]:-}" ] || pass teardown "nothing was started"
  echo "logs: $LOG_DIR"
  exit "$FAILED"
}

# ---- images / build ---------------------------------------------------------------------------------------------
smoke_images "docker.io/prom/prometheus:latest --version" "docker.io/library/haproxy:lts haproxy -v"
smoke_build "$IMAGE" "$CHECKPOINT"
if [ "${RESULT[build]}" != PASS ]; then skip_rest "no image"; summary; fi

# ---- up ---------------------------------------------------------------------------------------------------------
t0=$(date +%s)
LB_PORT=$(free_port "${SMOKE_API_PORT:-8000}")
STATS_PORT=$(free_port "${SMOKE_STATS_PORT:-8404}")
PROM_PORT=$(free_port "${SMOKE_PROM_PORT:-9090}")
export SHORTCUT_PUBLISH_PORT=$LB_PORT HAPROXY_STATS_PUBLISH_PORT=$STATS_PORT PROMETHEUS_PUBLISH_PORT=$PROM_PORT
LB="http://127.0.0.1:$LB_PORT"
STATS="http://127.0.0.1:$STATS_PORT"
PROM="http://127.0.0.1:$PROM_PORT"
compose down -v >/dev/null 2>&1 || true  # leftovers of an interrupted run
trap 'echo "interrupted"; teardown; exit 130' INT TERM
if compose up -d >"$LOG_DIR/up.log" 2>&1; then
  sleep 2
  running=$(podman ps -q --filter "label=io.podman.compose.project=$PROJECT" | wc -l)
  if [ "$running" -eq 5 ]; then
    pass up "api1..api3 + HAProxy on :$LB_PORT (stats :$STATS_PORT) + Prometheus on :$PROM_PORT, $(elapsed "$t0")"
  else
    podman ps -a --filter "label=io.podman.compose.project=$PROJECT" --format '  {{.Names}} {{.Status}}'
    dump_logs lb "${REPLICAS[@]}"
    fail up "$running of 5 containers running (see $LOG_DIR/up.log)"
  fi
else
  tail -n 20 "$LOG_DIR/up.log" | sed 's/^/  | /'
  fail up "podman-compose up failed (see $LOG_DIR/up.log)"
fi

if [ "${RESULT[up]}" = PASS ]; then
  # ---- ready ----------------------------------------------------------------------------------------------------
  t0=$(date +%s)
  ok=1
  for r in "${REPLICAS[@]}"; do
    "$PY" "$ROOT/deploy/smoke_client.py" wait "$(replica_url "$r")" /ready --timeout "$START_TIMEOUT" >/dev/null || { ok=0; log "$r never ready"; }
  done
  if [ "$ok" = 1 ] && "${CLIENT[@]}" servers "$STATS" api1=UP api2=UP api3=UP --timeout 30 \
     && "$PY" "$ROOT/deploy/smoke_client.py" wait "$LB" /ready --timeout 10 >/dev/null; then
    pass ready "3 replicas ready, all UP in HAProxy's /ready checks, $(elapsed "$t0")"
  else
    dump_logs lb "${REPLICAS[@]}"
    fail ready
  fi
fi

if [ "${RESULT[ready]:-}" = PASS ]; then
  # ---- balanced -------------------------------------------------------------------------------------------------
  # shellcheck disable=SC2046  # word splitting of --replica NAME=URL pairs
  if "${CLIENT[@]}" balanced "$LB" $(replica_args "${REPLICAS[@]}") --clients "$CLIENTS" --seconds "$SECONDS_LOAD" \
       --tokens "$TOKENS" --out "$LOG_DIR/three.json"; then
    pass balanced "$CLIENTS streaming clients, 0 errors, every replica served; $(figure "$LOG_DIR/three.json" tokens_per_s) tokens/s aggregate with 3 replicas"
  else
    fail balanced
  fi
  # shellcheck disable=SC2046  # one argument per container id
  podman stats --no-stream --format '  {{.Name}} mem {{.MemUsage}} cpu {{.CPUPerc}}' $(project_containers) 2>/dev/null | sort

  # ---- sse ------------------------------------------------------------------------------------------------------
  if "${CLIENT[@]}" sse "$LB"; then pass sse "token by token through HAProxy"; else fail sse; fi

  # ---- prometheus -----------------------------------------------------------------------------------------------
  t0=$(date +%s)
  if "${CLIENT[@]}" prometheus "$PROM" --replicas 3 --timeout 90; then pass prometheus "each replica scraped, $(elapsed "$t0")"; else fail prometheus; fi

  # ---- steering: one vector, every replica (the shared volume) -------------------------------------------------
  # shellcheck disable=SC2046  # word splitting of --replica NAME=URL pairs
  if "${CLIENT[@]}" steering "$LB" $(replica_args "${REPLICAS[@]}"); then
    pass steering "made through HAProxy, used on api1..api3, deleted everywhere"
  else
    dump_logs "${REPLICAS[@]}"; fail steering
  fi

  # ---- stop: SIGTERM to api1 mid-load ---------------------------------------------------------------------------
  # `podman stop` sends the stop signal (SIGTERM) and SIGKILLs only after -t (compose's stop_grace_period);
  # a stopped container stays stopped.
  c1=$(container_of api1)
  if "${CLIENT[@]}" stop "$LB" --victim "api1=$(replica_url api1)" -- podman stop -t 45 "$c1"; then
    state=$(podman inspect --format '{{.State.Status}} {{.State.ExitCode}}' "$c1")
    if [ "$state" = "exited 0" ]; then
      pass stop "api1 drained under load: 0 failed requests, it exited 0 by itself"
    else
      dump_logs api1; fail stop "api1 state '$state' after the stop (137 = SIGKILLed)"
    fi
  else
    dump_logs api1 lb; fail stop
  fi

  # ---- kill: SIGKILL to api2 mid-load ---------------------------------------------------------------------------
  c2=$(container_of api2)
  if "${CLIENT[@]}" kill "$LB" --victim "api2=$(replica_url api2)" --stats "$STATS" -- podman kill -s KILL "$c2"; then
    pass kill "only api2's in-flight requests failed; new requests kept succeeding on api3"
  else
    dump_logs api2 lb; fail kill
  fi
  log "api2 after the kill: $(podman inspect --format 'status {{.State.Status}}, restarts {{.RestartCount}}' "$c2" 2>/dev/null) (restart: unless-stopped)"

  # ---- single: the same load on api3 alone ----------------------------------------------------------------------
  podman stop -t 45 "$c2" >/dev/null 2>&1
  if "${CLIENT[@]}" servers "$STATS" api1=DOWN api2=DOWN api3=UP --timeout 30 >/dev/null \
     && "${CLIENT[@]}" balanced "$LB" --replica "api3=$(replica_url api3)" --clients "$CLIENTS" --seconds "$SECONDS_LOAD" \
          --tokens "$TOKENS" --out "$LOG_DIR/one.json"; then
    pass single "$(figure "$LOG_DIR/one.json" tokens_per_s) tokens/s with 1 replica vs $(figure "$LOG_DIR/three.json" tokens_per_s) with 3 (same load; the replicas share this machine's $(nproc) CPUs)"
  else
    fail single
  fi
  # HAProxy logs a retried request's retry count as "+N" (redispatched to another server) in its connection counters
  redispatched=$(podman logs "$(container_of lb)" 2>&1 | grep -cE '/\+[0-9]+ [0-9]+/[0-9]+ "' || true)
  log "HAProxy retried $redispatched requests on another replica (retry-on 503 / refused / empty response)"
fi
skip_rest "an earlier step failed"

# ---- teardown ---------------------------------------------------------------------------------------------------
teardown
summary
