# demo hook (issue 7, KubeEdge sync): after the run time, stop the simulated line (so the agent's
# properties stop changing), wait until the twins the simulated EdgeCore holds equal the agent's latest
# properties, and show both: the twin state EdgeCore holds (from its log) and the comparison.
# Sourced by demo.sh before `status`.
if [ -n "${BG_PIDS[simulated-line]:-}" ]; then
  echo "stopping the simulated line (pid ${BG_PIDS[simulated-line]}): the agent's properties stop changing"
  stop_pid "${BG_PIDS[simulated-line]}"
fi
if [ -n "${BG_PIDS[edgecore-sim]:-}" ]; then
  echo "edgecore_sim.py compare: EdgeCore's twins vs the agent's latest properties (waits up to 15 s for the sync)"
  "$PY" scripts/demo/edgecore_sim.py compare --config "$CONFIG" --state "$DEMO_DIR/edgecore-twins.json" --timeout 15 \
    || echo "demo: twins not in sync (see ${DEMO_DIR#"$REPO"/}/edgecore-sim.log and agent.log)"
  kill -USR1 "${BG_PIDS[edgecore-sim]}"
  for _ in $(seq 1 30); do grep -q 'holds (on request)' "$DEMO_DIR/edgecore-sim.log" && break; sleep 0.1; done
  echo "the simulated EdgeCore's log (${DEMO_DIR#"$REPO"/}/edgecore-sim.log), twin state it holds:"
  sed -n '/holds (on request)/,/^---$/p' "$DEMO_DIR/edgecore-sim.log" | tail -n 30
fi
