# demo hook (issue 6, fleet): the fleet path on the same local broker (a small site: fleet broker = local
# broker, [fleet] in configs/demo.toml). While the line still runs, the fleet manager pushes gate v2
# (same policy code, data-v2.json: press3 locked out too), signed with the demo fleet key, to
# gw/<node id>; the daemon verifies it, shadow-evaluates it on recorded decisions, hot-swaps it and
# reports; `edge-fleet rollout` (the manager's view) shows it active. The retained release is cleared
# at the end (gateways keep what they run), so the next demo run starts from v1 again.
# Sourced by demo.sh after the run time (needs the pipeline hooks: the fleet key, pipe_next_version).
read -r FLEET_URL FLEET_NODE FLEET_ON < <("$PY" -c 'import sys; from pathlib import Path
from agent.config import load_config
c = load_config(Path(sys.argv[1]))
print(c.fleet.url or "-", c.node_id, int(c.fleet.enabled))' "$CONFIG")
if [ "$FLEET_ON" = 1 ] && [ -n "${FLEET_KEY_DIR:-}" ] && declare -F pipe_next_version >/dev/null; then
  FLEET=("$PY" -c 'from agent.cli.fleet_main import main; raise SystemExit(main())')
  gate_v=$(pipe_next_version policy gate)
  "$PY" -m agent_devkit.opa.gate "$PIPE_DIR/gate-policy-v$gate_v.tar.gz" --data examples/policies/data-v2.json
  echo "(gate.c + data-v2.json: press3 locked out too) for v$gate_v"
  artifact="$PIPE_DIR/gate-policy-v$gate_v.tar.gz"
  "${FLEET[@]}" sign "$artifact" --key "$FLEET_KEY_DIR/fleet.key" --kind policy --name gate --version "$gate_v" \
    --out "$artifact.sigstore.json"
  echo "edge-fleet push ${artifact#"$REPO"/} --target gw/$FLEET_NODE --broker $FLEET_URL"
  "${FLEET[@]}" push "$artifact" --bundle "$artifact.sigstore.json" --target "gw/$FLEET_NODE" --broker "$FLEET_URL" \
    --timeout 15
  # the gateway's own word first (its status is stored before it is published), then the manager's view
  for _ in $(seq 1 50); do
    { "${AGENT[@]}" status --config "$CONFIG" --json 2>/dev/null || true; } | "$PY" -c 'import json, sys
v = int(sys.argv[1])
rows = json.load(sys.stdin).get("fleet") or []
sys.exit(0 if any(r["name"] == "gate" and r["version"] == v and r["state"] in ("active", "rejected", "rolled_back")
                  for r in rows) else 1)' "$gate_v" && break
    sleep 0.2
  done
  echo "edge-fleet rollout --kind policy --name gate --version $gate_v --broker $FLEET_URL --expect 1"
  "${FLEET[@]}" rollout --kind policy --name gate --version "$gate_v" --broker "$FLEET_URL" --expect 1 \
    --timeout 15 || echo "demo: the rollout of gate v$gate_v did not converge to active"
  echo "edge-fleet push --clear --target gw/$FLEET_NODE (the retained release goes; the gateway keeps running v$gate_v)"
  "${FLEET[@]}" push "$artifact" --bundle "$artifact.sigstore.json" --target "gw/$FLEET_NODE" --broker "$FLEET_URL" \
    --clear --timeout 15
fi
