"""Store-and-forward to the cloud (outbox + drain) and KubeEdge device-twin sync."""
