# demo hook (issue 7, KubeEdge sync): a simulated EdgeCore on the local broker (scripts/demo/edgecore_sim.py:
# the strict EdgeCore test peer of agent_devkit/edgecore.py as a process), node demo-node, bound to the
# Devices of configs/kubeedge/device.yaml whose spec.nodeName is demo-node (press-1, press-2; press-3 is
# on another node). Started before the daemon so it hears the agent's first membership/get; stopped by
# pid when the demo ends. Sourced by demo.sh.
EDGECORE_STATE="$DEMO_DIR/edgecore-twins.json"
rm -f "$EDGECORE_STATE"
start_bg edgecore-sim "$PY" scripts/demo/edgecore_sim.py serve --config "$CONFIG" --state "$EDGECORE_STATE"
for _ in $(seq 1 100); do
  grep -q '^connected' "$DEMO_DIR/edgecore-sim.log" 2>/dev/null && break
  kill -0 "${BG_PIDS[edgecore-sim]}" 2>/dev/null || break
  sleep 0.1
done
if ! grep -q '^connected' "$DEMO_DIR/edgecore-sim.log" 2>/dev/null; then
  echo "demo: the simulated EdgeCore did not connect; its log:" >&2
  cat "$DEMO_DIR/edgecore-sim.log" >&2
  exit 1
fi
cat "$DEMO_DIR/edgecore-sim.log"
echo "(pid ${BG_PIDS[edgecore-sim]}, log ${DEMO_DIR#"$REPO"/}/edgecore-sim.log; watch: mosquitto_sub -h $BROKER_HOST -p $BROKER_PORT -t '\$hw/#' -v)"
