"""Typed errors of the policy engine."""

from __future__ import annotations

from agent.errors import AgentError


class PolicyLoadError(AgentError):
    """The policy cannot be loaded: bad Wasm, unsupported ABI, missing builtin, bad data or bundle."""

    code = "policy_load_failed"


class PolicyEvalError(AgentError):
    """One evaluation failed. ``code`` is one of: trap, deadline, memory, abort, builtin_error,
    output_too_large, bad_input, unknown_entrypoint. The instance that failed was discarded."""

    code = "trap"


class BuiltinError(AgentError):
    """Raised by a host builtin to fail the evaluation (OPA's strict builtin-error mode)."""

    code = "builtin_error"
