"""policy package: the OPA-Wasm engine (see ``agent.policy.engine``)."""

# agent.config's model imports this package's settings; import config first so that importing
# any agent.policy module on its own never hits a half-initialised circular import.
import agent.config  # noqa: F401
