"""policy package: the OPA-Wasm engine (see ``agent.policy.engine``)."""
