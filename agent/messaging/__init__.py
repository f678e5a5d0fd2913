"""The local bus (the gateway's MQTT broker) and durable ingest of sensor readings."""
