# shellcheck shell=bash disable=SC2034  # FAILED is read by the caller's summary()
# Shared by deploy/compose-smoke.sh and deploy/scale-smoke.sh (sourced, not run): step results, host ports,
# and the `images` and `build` steps. The caller sets ROOT, PY, LOG_DIR and STEPS, and defines summary().

declare -A RESULT=()
FAILED=0
pass() { RESULT[$1]=PASS; echo "PASS $1${2:+ ($2)}"; }
fail() { RESULT[$1]=FAIL; FAILED=1; echo "FAIL $1${2:+: $2}"; }
skip_rest() {  # mark every step not yet run as failed (skipped), except teardown
  for s in "${STEPS[@]}"; do
    [ "$s" = teardown ] && continue
    [ -n "${RESULT[$s]:-}" ] || fail "$s" "skipped: $1"
  done
}
log() { echo "  $*"; }
elapsed() { echo "$(( $(date +%s) - $1 ))s"; }

free_port() {  # free_port PREFERRED -> PREFERRED if free on the host, else some free port
  "$PY" - "$1" <<'EOF'
import socket, sys
want = int(sys.argv[1])
for port in (want, 0):
    s = socket.socket()
    try:
        s.bind(("127.0.0.1", port)); print(s.getsockname()[1]); break
    except OSError:
        pass
    finally:
        s.close()
EOF
}

# images: podman, podman-compose and local stand-ins of the base images (../shared/tools/container-images.sh),
# then each image named in the arguments must run (`IMAGE ARGS...` as one string, e.g. "docker.io/prom/prometheus:latest --version").
# Ends the run (skip_rest + summary) when something is missing.
smoke_images() {
  local t0 standins check
  t0=$(date +%s)
  standins="$ROOT/../shared/tools/container-images.sh"
  if [ -f "$standins" ] && ! bash "$standins" >"$LOG_DIR/images.log" 2>&1; then
    fail images "container-images.sh failed (see $LOG_DIR/images.log)"; skip_rest "no container images"; summary
  fi
  if ! command -v podman >/dev/null || ! command -v podman-compose >/dev/null; then
    fail images "podman or podman-compose missing"; skip_rest "no podman"; summary
  fi
  for check in "$@"; do
    # shellcheck disable=SC2086  # IMAGE and its arguments
    if ! podman run --rm $check >"$LOG_DIR/image-check.log" 2>&1; then
      # (a stand-in built with `ln -sf` over Debian's merged /bin -> usr/bin replaces the binary by a self-link)
      fail images "the ${check%% *} image does not run: $(tail -n1 "$LOG_DIR/image-check.log")"
      skip_rest "image ${check%% *} broken"; summary
    fi
  done
  pass images "$(podman --version | awk '{print $NF}'), podman-compose $(podman-compose version 2>/dev/null | awk '/podman-compose/ {print $NF}'), $(elapsed "$t0")"
}

# build: the Dockerfile as IMAGE, torch from this machine's local wheel folder (pip's find-links) when there is
# one; checks the image runs as non-root with a HEALTHCHECK on /health. SMOKE_SKIP_BUILD=1 reuses an existing IMAGE.
smoke_build() {
  local image=$1 checkpoint=$2 t0 wheels user health torch
  local build_args=()
  t0=$(date +%s)
  if [ "${SMOKE_SKIP_BUILD:-0}" = 1 ] && podman image exists "$image"; then
    pass build "SMOKE_SKIP_BUILD=1: using the existing $image"; return
  fi
  if [ ! -f "$checkpoint" ]; then
    fail build "$checkpoint missing: the image bakes it in (train it first)"; return
  fi
  wheels=${SMOKE_WHEELS:-$("$PY" -m pip config get global.find-links 2>/dev/null | head -n1 | awk '{print $1}')}
  [ -n "$wheels" ] || wheels=/opt/wheels
  if [ -d "$wheels" ] && compgen -G "$wheels/torch-*.whl" >/dev/null; then
    build_args=(-v "$wheels:/wheels:ro" --build-arg PIP_FIND_LINKS=/wheels)
    log "torch from the local wheel folder $wheels"
  else
    log "no local torch wheel; torch from the Dockerfile's TORCH_INDEX_URL"
  fi
  # --format docker keeps HEALTHCHECK (the OCI format drops it)
  if podman build --format docker -f Dockerfile -t "$image" "${build_args[@]}" . >"$LOG_DIR/build.log" 2>&1; then
    user=$(podman image inspect --format '{{.Config.User}}' "$image")
    health=$(podman image inspect --format '{{if .Config.Healthcheck}}{{.Config.Healthcheck.Test}}{{end}}' "$image" 2>/dev/null \
             || podman image inspect --format '{{.Healthcheck}}' "$image")
    torch=$(podman run --rm --entrypoint python "$image" -c "import torch; print(torch.__version__)" 2>&1 | tail -n1)
    if [ -z "$user" ] || [ "${user%%:*}" = root ] || [ "${user%%:*}" = 0 ]; then
      fail build "image runs as root"
    elif [[ "$health" != *"/health"* ]]; then
      fail build "image has no HEALTHCHECK on /health ($health)"
    else
      pass build "$(podman image inspect --format '{{.Size}}' "$image" | awk '{printf "%.2f GB", $1/1e9}'), user $user, torch $torch, $(elapsed "$t0")"
    fi
  else
    tail -n 25 "$LOG_DIR/build.log" | sed 's/^/  | /'
    fail build "podman build failed (see $LOG_DIR/build.log)"
  fi
}
