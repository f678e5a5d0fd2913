# demo hook (issue 5, pipeline): a simulated production line publishing readings under factory/… on
# the local broker (3 presses heating and cooling, rpm/pressure pairs, one malformed payload in 40).
# The thermostat module turns fans on/off; the gate policy masks the sensor value from the command
# and denies press2 (locked out for maintenance). Stopped by pid when the demo ends.
start_bg simulated-line "$PY" scripts/demo/simulate_line.py --host "$BROKER_HOST" --port "$BROKER_PORT" \
  --lines 1 --sensors 3 --rate 15 --period 12 --malformed-every 40
echo "simulated line publishing (pid ${BG_PIDS[simulated-line]}, log ${DEMO_DIR#"$REPO"/}/simulated-line.log)"
echo "watch the actuations:  mosquitto_sub -h $BROKER_HOST -p $BROKER_PORT -t 'actuators/#' -v"
