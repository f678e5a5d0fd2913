#!/usr/bin/env bash
# The demo (README, "Quick start" and "A quick tour"): a local MQTT broker, the daemon on configs/demo.toml for a while,
# then `edge-agent status`. Everything lives under var/demo/; every process started here is stopped by
# its pid at the end, whatever happens.
#
#   bash scripts/demo.sh                  # ~30 s (the daemon runs 20 s)
#   DEMO_SECONDS=60 bash scripts/demo.sh  # longer
#   DEMO_SKIP_SETUP=1 bash scripts/demo.sh  # reuse .venv as it is
#   DEMO_FRESH=0 bash scripts/demo.sh     # keep var/demo/state from the last run (default: start clean)
#   DEMO_CONFIG=… DEMO_DIR=…              # another config / working dir (the test runs it on a free port)
#
# Later issues add steps without editing this file: drop a script into
#   scripts/demo/pre/NN-name.sh   sourced in order BEFORE the daemon starts (e.g. install signed releases)
#   scripts/demo/run/NN-name.sh   sourced in order WHILE the daemon runs (e.g. a simulated line)
#   scripts/demo/post/NN-name.sh  sourced in order after the run time, BEFORE `status` (e.g. check the twins)
# Hooks see: REPO, PY, AGENT (edge-agent command), CONFIG, STATE_DIR, DEMO_DIR, BROKER_HOST, BROKER_PORT,
# AGENT_PID (run hooks), and may call: step "title", start_bg NAME CMD… (a background process stopped by
# pid at exit; its pid is in BG_PIDS[NAME]), stop_pid PID, wait_port PORT.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
cd "$REPO"

DEMO_SECONDS=${DEMO_SECONDS:-20}
DEMO_DIR=${DEMO_DIR:-"$REPO/var/demo"}         # broker config, logs (the state dir comes from the config)
CONFIG=${DEMO_CONFIG:-"$REPO/configs/demo.toml"}
PY="$REPO/.venv/bin/python"
AGENT=("$PY" -m agent)
AGENT_PID=""
declare -A BG_PIDS=()

step() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }

port_open() { (exec 3<>"/dev/tcp/$BROKER_HOST/$1") 2>/dev/null; }

wait_port() {
  local port=$1 i
  for i in $(seq 1 100); do port_open "$port" && return 0; sleep 0.1; done
  echo "demo: nothing listens on $BROKER_HOST:$port" >&2; return 1
}

start_bg() {  # start_bg NAME CMD... : a background process with its own log, stopped by pid at exit
  local name=$1; shift
  "$@" >"$DEMO_DIR/$name.log" 2>&1 &
  BG_PIDS[$name]=$!
}

stop_pid() {  # stop_pid PID: SIGTERM, wait up to 15 s, then SIGKILL
  local pid=$1 i
  kill -0 "$pid" 2>/dev/null || return 0
  kill -TERM "$pid" 2>/dev/null || true
  for i in $(seq 1 150); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
  kill -KILL "$pid" 2>/dev/null || true
}

cleanup() {
  local name
  [ -n "$AGENT_PID" ] && stop_pid "$AGENT_PID"
  for name in "${!BG_PIDS[@]}"; do stop_pid "${BG_PIDS[$name]}"; done
  return 0
}
trap cleanup EXIT
trap 'exit 130' INT TERM

run_hooks() {  # run_hooks pre|run
  local hook
  for hook in "$REPO"/scripts/demo/"$1"/*.sh; do
    [ -e "$hook" ] || continue
    step "hook: ${hook#"$REPO"/}"
    # shellcheck source=/dev/null
    source "$hook"
  done
}

# ---- 1. set-up -------------------------------------------------------------------------------------
if [ "${DEMO_SKIP_SETUP:-0}" != 1 ]; then
  step "set-up (scripts/setup.sh: system packages if missing, .venv)"
  bash scripts/setup.sh
fi
mkdir -p "$DEMO_DIR"
read -r STATE_DIR BROKER_HOST BROKER_PORT < <("$PY" -c 'import sys; from pathlib import Path
from agent.config import load_config
c = load_config(Path(sys.argv[1]))
print(c.state_dir, c.local_broker.host, c.local_broker.port)' "$CONFIG")
if [ "${DEMO_FRESH:-1}" = 1 ] && [ -d "$STATE_DIR" ]; then
  rm -rf "$STATE_DIR"
fi

# ---- 2. the local broker -----------------------------------------------------------------------------
step "local MQTT broker on $BROKER_HOST:$BROKER_PORT"
if port_open "$BROKER_PORT"; then
  echo "something already listens on $BROKER_HOST:$BROKER_PORT: using it"
else
  mkdir -p "$DEMO_DIR/mosquitto"
  cat >"$DEMO_DIR/mosquitto.conf" <<EOF
listener $BROKER_PORT $BROKER_HOST
allow_anonymous true
persistence true
persistence_location $DEMO_DIR/mosquitto/
log_dest file $DEMO_DIR/mosquitto/mosquitto.log
EOF
  mosq=$(command -v mosquitto || echo /usr/sbin/mosquitto)
  start_bg mosquitto "$mosq" -c "$DEMO_DIR/mosquitto.conf"
  wait_port "$BROKER_PORT"
  echo "started mosquitto (pid ${BG_PIDS[mosquitto]}, config $DEMO_DIR/mosquitto.conf)"
fi

run_hooks pre

# ---- 3. the daemon -------------------------------------------------------------------------------------
step "edge-agent run --config ${CONFIG#"$REPO"/} (state: ${STATE_DIR#"$REPO"/}, log: ${DEMO_DIR#"$REPO"/}/agent.log)"
env -u NOTIFY_SOCKET -u WATCHDOG_USEC "${AGENT[@]}" run --config "$CONFIG" >"$DEMO_DIR/agent.log" 2>&1 &
AGENT_PID=$!
ready=0
for _ in $(seq 1 300); do
  if ! kill -0 "$AGENT_PID" 2>/dev/null; then break; fi
  # `status` exits 1 when it lists problems (pipefail): only its output counts here
  if { "${AGENT[@]}" status --config "$CONFIG" --json 2>/dev/null || true; } | grep -q '"state": "running"'; then
    ready=1; break
  fi
  sleep 0.2
done
if [ "$ready" != 1 ]; then
  echo "demo: the daemon did not come up; its log:" >&2
  tail -n 30 "$DEMO_DIR/agent.log" >&2
  exit 1
fi
echo "daemon running (pid $AGENT_PID)"

run_hooks run

step "running for $DEMO_SECONDS s (offline is normal: it needs no network)"
end=$((SECONDS + DEMO_SECONDS))
while [ $SECONDS -lt $end ]; do
  kill -0 "$AGENT_PID" 2>/dev/null || { echo "demo: the daemon exited early" >&2; tail -n 30 "$DEMO_DIR/agent.log" >&2; exit 1; }
  sleep 1
done

run_hooks post

# ---- 4. status -------------------------------------------------------------------------------------------
step "edge-agent status (what a field technician sees)"
"${AGENT[@]}" status --config "$CONFIG" || true
step "edge-agent status --json (edge-agent.status/v1)"
"${AGENT[@]}" status --config "$CONFIG" --json | sed -n 1,40p || true

# ---- 5. stop --------------------------------------------------------------------------------------------
step "stopping the daemon (SIGTERM, pid $AGENT_PID)"
kill -TERM "$AGENT_PID"
code=0
wait "$AGENT_PID" || code=$?
AGENT_PID=""
echo "daemon exited with code $code; last log lines (JSON, journald <N> priority prefix):"
tail -n 3 "$DEMO_DIR/agent.log"
step "status after the stop (exit code 1 = not running, as expected)"
"${AGENT[@]}" status --config "$CONFIG" || true
exit "$code"
