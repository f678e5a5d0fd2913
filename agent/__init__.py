"""edge-agent: an offline-autonomous IoT edge agent for factory gateways."""

__version__ = "0.1.0"
