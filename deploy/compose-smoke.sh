#!/usr/bin/env bash
# Proof that the real Dockerfile and docker-compose.yml work, with podman (`make compose-smoke`):
#   images       podman + local stand-ins for python:3.11-slim / prom/prometheus (../shared/tools/container-images.sh)
#   build        the Dockerfile, torch from this machine's local wheel folder (pip's find-links) when there is one
#   up           `podman-compose up -d api prometheus` from docker-compose.yml (no Grafana image here)
#   health       /health and /ready through the published port, and the compose healthcheck command
#   generate     POST /generate (shape; same seed -> same text)
#   diagnostics  GET /diagnostics?format=text
#   prometheus   Prometheus scrapes the api (up == 1) and its latency histograms have counts
#   rules        the recording rules load and evaluate
#   drain        SIGTERM (podman stop) with long /generate requests in flight: all finish with 200, exit code 0
#   teardown     `podman-compose down -v`, nothing of the project left
# One PASS/FAIL line per step; exit 0 only if all pass. Logs go to $SMOKE_LOG_DIR (default: a temp folder).
#
# Knobs: SMOKE_PROJECT (shortcut-smoke), SMOKE_API_PORT (8000), SMOKE_PROM_PORT (9090), SMOKE_WHEELS (local wheel
# folder; default pip's find-links, else /opt/wheels), SMOKE_SKIP_BUILD=1 (use the image already built), SMOKE_IMAGE,
# SMOKE_KEEP=1 (leave the stack up), SMOKE_START_TIMEOUT (240 s), SMOKE_STOP_TIMEOUT (45 s, as stop_grace_period).
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
PROJECT=${SMOKE_PROJECT:-shortcut-smoke}
IMAGE=${SMOKE_IMAGE:-localhost/shortcut-api:latest}
CHECKPOINT=model/checkpoints/shakespeare.safetensors
START_TIMEOUT=${SMOKE_START_TIMEOUT:-240}
LOG_DIR=${SMOKE_LOG_DIR:-$(mktemp -d /tmp/compose-smoke.XXXXXX)}
mkdir -p "$LOG_DIR"
PY=$(command -v python3 || command -v python)
CLIENT=("$PY" "$ROOT/deploy/smoke_client.py")

# Settings come from docker-compose.yml's defaults, not from whatever this shell exports.
for v in $(compgen -e | grep -E '^(SHORTCUT_|PROMETHEUS_|GRAFANA_)' || true); do unset "$v"; done
export SHORTCUT_IMAGE=$IMAGE

STEPS=(images build up health generate diagnostics prometheus rules drain teardown)
# pass/fail/skip_rest/log/elapsed/free_port and the images and build steps
source "$ROOT/deploy/smoke-lib.sh"

compose() { podman-compose -p "$PROJECT" -f "$ROOT/docker-compose.yml" "$@"; }
api_container() { podman ps -a -q --filter "label=io.podman.compose.project=$PROJECT" --filter "label=com.docker.compose.service=api" | head -n1; }
dump_api_logs() { local c; c=$(api_container); [ -n "$c" ] && podman logs --tail 40 "$c" 2>&1 | sed 's/^/  | /'; }

teardown() {
  [ "${SMOKE_KEEP:-0}" = 1 ] && { log "SMOKE_KEEP=1: stack left up (project $PROJECT)"; pass teardown "kept"; return; }
  compose down -v >"$LOG_DIR/down.log" 2>&1
  podman network rm -f "${PROJECT}_default" >>"$LOG_DIR/down.log" 2>&1 || true  # podman-compose 1.0.3 leaves it
  local left
  left=$(podman ps -a -q --filter "label=io.podman.compose.project=$PROJECT" | wc -l)
  left=$(( left + $(podman volume ls -q --filter "label=io.podman.compose.project=$PROJECT" | wc -l) ))
  if [ "$left" -eq 0 ]; then pass teardown; else fail teardown "$left containers/volumes of $PROJECT left (see $LOG_DIR/down.log)"; fi
}

summary() {
  [ -n "${RESULT[teardown]:-}" ] || pass teardown "nothing was started"
  echo "logs: $LOG_DIR"
  exit "$FAILED"
}

# ---- images -----------------------------------------------------------------------------------------------------
smoke_images "docker.io/prom/prometheus:latest --version"

# ---- build ------------------------------------------------------------------------------------------------------
smoke_build "$IMAGE" "$CHECKPOINT"
if [ "${RESULT[build]}" != PASS ]; then skip_rest "no image"; summary; fi

# ---- up ---------------------------------------------------------------------------------------------------------
t0=$(date +%s)
API_PORT=$(free_port "${SMOKE_API_PORT:-8000}")
PROM_PORT=$(free_port "${SMOKE_PROM_PORT:-9090}")
export SHORTCUT_PUBLISH_PORT=$API_PORT PROMETHEUS_PUBLISH_PORT=$PROM_PORT
API="http://127.0.0.1:$API_PORT"
PROM="http://127.0.0.1:$PROM_PORT"
[ "$API_PORT" = "${SMOKE_API_PORT:-8000}" ] || log "port ${SMOKE_API_PORT:-8000} busy: api published on $API_PORT"
[ "$PROM_PORT" = "${SMOKE_PROM_PORT:-9090}" ] || log "port ${SMOKE_PROM_PORT:-9090} busy: prometheus published on $PROM_PORT"
compose down -v >/dev/null 2>&1 || true  # leftovers of an interrupted run
trap 'echo "interrupted"; teardown; exit 130' INT TERM
if compose up -d --no-build api prometheus >"$LOG_DIR/up.log" 2>&1; then
  sleep 2
  running=$(podman ps -q --filter "label=io.podman.compose.project=$PROJECT" | wc -l)
  if [ "$running" -ge 2 ]; then
    pass up "api on :$API_PORT, prometheus on :$PROM_PORT, $(elapsed "$t0")"
  else
    podman ps -a --filter "label=io.podman.compose.project=$PROJECT" --format '  {{.Names}} {{.Status}}'
    dump_api_logs
    fail up "$running of 2 containers running (see $LOG_DIR/up.log)"
  fi
else
  tail -n 20 "$LOG_DIR/up.log" | sed 's/^/  | /'
  fail up "podman-compose up failed (see $LOG_DIR/up.log)"
fi

if [ "${RESULT[up]}" = PASS ]; then
  # ---- health -------------------------------------------------------------------------------------------------
  t0=$(date +%s)
  if "${CLIENT[@]}" wait "$API" /health --timeout "$START_TIMEOUT" && "${CLIENT[@]}" wait "$API" /ready --timeout "$START_TIMEOUT"; then
    if podman healthcheck run "$(api_container)" >/dev/null 2>&1; then
      pass health "/health, /ready and the compose healthcheck command, $(elapsed "$t0")"
    else
      fail health "the compose healthcheck command fails inside the container"
    fi
  else
    dump_api_logs
    fail health "api never became ready"
  fi

  if [ "${RESULT[health]}" = PASS ]; then
    # ---- generate / diagnostics ---------------------------------------------------------------------------------
    if "${CLIENT[@]}" generate "$API"; then pass generate; else fail generate; fi
    if "${CLIENT[@]}" diagnostics "$API"; then pass diagnostics; else fail diagnostics; fi
    # ---- prometheus ---------------------------------------------------------------------------------------------
    t0=$(date +%s)
    if "${CLIENT[@]}" prometheus "$PROM" --timeout 90; then pass prometheus "$(elapsed "$t0")"; else fail prometheus; fi
    t0=$(date +%s)
    if "${CLIENT[@]}" rules "$PROM" --timeout 90; then pass rules "$(elapsed "$t0")"; else fail rules; fi
    # ---- drain --------------------------------------------------------------------------------------------------
    # `podman stop` sends the container's stop signal (SIGTERM, from stop_signal) and SIGKILLs only after the
    # timeout, like `docker compose stop` with stop_grace_period (podman-compose 1.0.3 does not pass that on).
    # A stopped container stays stopped (a `podman kill` would let restart: unless-stopped bring it back).
    cid=$(api_container)
    stop_signal=$(podman inspect --format '{{.Config.StopSignal}}' "$cid")
    if "${CLIENT[@]}" drain "$API" -- podman stop -t "${SMOKE_STOP_TIMEOUT:-45}" "$cid"; then
      state=$(podman inspect --format '{{.State.Status}} {{.State.ExitCode}}' "$cid")
      if [ "$state" = "exited 0" ]; then
        pass drain "stop signal $stop_signal; all requests finished; the container exited 0 by itself"
      else
        dump_api_logs
        fail drain "container state '$state' after the stop (137 = SIGKILLed: the drain outlasted the timeout)"
      fi
    else
      dump_api_logs
      fail drain
    fi
  fi
fi
skip_rest "an earlier step failed"

# ---- teardown ---------------------------------------------------------------------------------------------------
podman logs "$(api_container)" >"$LOG_DIR/api.log" 2>&1 || true
teardown
summary
