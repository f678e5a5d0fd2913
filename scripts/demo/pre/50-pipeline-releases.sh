# demo hook (issue 5, pipeline): sign the example thermostat module (C → Wasm) and the gate policy
# (OPA Wasm bundle) with a fleet key, trust that key, and install both through the normal release path
# (`edge-agent install`: the same verification as releases arriving over MQTT). Sourced by demo.sh.
PIPE_DIR="$DEMO_DIR/pipeline"
mkdir -p "$PIPE_DIR"
FLEET_KEY_DIR=${FLEET_KEY_DIR:-"$DEMO_DIR/keys"}
if [ ! -f "$FLEET_KEY_DIR/fleet.key" ]; then
  echo "edge-fleet keygen --out ${FLEET_KEY_DIR#"$REPO"/} --name fleet"
  "$PY" -c 'from agent.cli.fleet_main import main; raise SystemExit(main())' keygen --out "$FLEET_KEY_DIR" --name fleet
fi
echo "edge-agent trust add fleet.pub --kinds module,policy"
"${AGENT[@]}" trust add "$FLEET_KEY_DIR/fleet.pub" --kinds module,policy --comment "demo fleet key" \
  --config "$CONFIG" || echo "(key already trusted)"

echo "building the example modules (scripts/build-examples.sh) and the gate policy (python -m agent_devkit.opa.gate)"
bash scripts/build-examples.sh >/dev/null
"$PY" -m agent_devkit.opa.gate "$PIPE_DIR/gate-policy.tar.gz"
cp examples/build/thermostat.wasm "$PIPE_DIR/thermostat.wasm"
cat >"$PIPE_DIR/thermostat.meta.json" <<'JSON'
{"trigger": {"type": "topic", "topics": ["factory/+/+/temp"], "batch_window_ms": 0},
 "config": {"metric": "temp", "high": 30.0, "low": 27.0, "actuator_prefix": "actuators"}}
JSON

pipe_next_version() {  # the installed version + 1 (versions must grow; a kept state dir remembers them)
  { "${AGENT[@]}" status --config "$CONFIG" --json 2>/dev/null || true; } | "$PY" -c 'import json, sys
try:
    rels = json.load(sys.stdin).get("releases") or []
except ValueError:
    rels = []
print(1 + max([int(r.get("version", 0)) for r in rels if r.get("kind") == sys.argv[1] and r.get("name") == sys.argv[2]],
              default=0))' "$1" "$2"
}
pipe_install() {  # pipe_install ARTIFACT KIND NAME [--meta FILE]
  local artifact=$1 kind=$2 name=$3 version; shift 3
  version=$(pipe_next_version "$kind" "$name")
  "$PY" -c 'from agent.cli.fleet_main import main; raise SystemExit(main())' sign "$artifact" \
    --key "$FLEET_KEY_DIR/fleet.key" --kind "$kind" --name "$name" --version "$version" "$@" \
    --out "$artifact.sigstore.json"
  echo "edge-agent install ${artifact#"$REPO"/} --bundle ${artifact#"$REPO"/}.sigstore.json  ($kind $name v$version)"
  "${AGENT[@]}" install "$artifact" --bundle "$artifact.sigstore.json" --config "$CONFIG"
}
pipe_install "$PIPE_DIR/thermostat.wasm" module thermostat --meta "$PIPE_DIR/thermostat.meta.json"
pipe_install "$PIPE_DIR/gate-policy.tar.gz" policy gate
