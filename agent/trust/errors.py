"""Why a release (or a key-set update) was refused: one exception class per rule, each with a stable code.

The ``code`` is what the fleet sees in a rejection report and what ``status`` shows in its error log;
the message says, in words a field technician can act on, which check failed.
"""

from __future__ import annotations

from agent.errors import AgentError


class TrustError(AgentError):
    """Trust-store problems that are not about a particular release (bad key file, unknown key id)."""

    code = "trust_error"


class ReleaseRejected(AgentError):
    """Base of every rejection: nothing was stored or changed."""

    code = "release_rejected"


class Unsigned(ReleaseRejected):
    code = "unsigned"


class BadSignature(ReleaseRejected):
    code = "bad_signature"


class UnknownKey(ReleaseRejected):
    code = "unknown_key"


class KeyOutOfScope(ReleaseRejected):
    code = "key_out_of_scope"


class DigestMismatch(ReleaseRejected):
    code = "digest_mismatch"


class MalformedBundle(ReleaseRejected):
    code = "malformed_bundle"


class MalformedStatement(ReleaseRejected):
    code = "malformed_statement"


class MalformedPredicate(ReleaseRejected):
    code = "malformed_predicate"


class VersionOutOfRange(MalformedPredicate):
    """A version past what the gateway can store and compare (1 .. 2^63 - 1, SQLite's signed 64 bits):
    refused when signing and when verifying, never a traceback at install."""

    code = "version_out_of_range"


class WrongPredicateType(ReleaseRejected):
    code = "wrong_predicate_type"


class VersionNotNewer(ReleaseRejected):
    code = "version_not_newer"


class Expired(ReleaseRejected):
    code = "expired"


class NotYetValid(ReleaseRejected):
    code = "not_yet_valid"


class InvalidWasm(ReleaseRejected):
    code = "invalid_wasm"


class InvalidOpaBundle(ReleaseRejected):
    code = "invalid_opa_bundle"


class UnsafeArchive(ReleaseRejected):
    code = "unsafe_archive"


class Oversize(ReleaseRejected):
    code = "oversize"


class AgentTooOld(ReleaseRejected):
    code = "agent_too_old"


class PolicyUnsupported(ReleaseRejected):
    """A policy this agent cannot load (a builtin it lacks, an ABI it does not speak, an entrypoint the
    predicate names but the Wasm does not export): refused at install, not found out by the daemon."""

    code = "policy_unsupported"


class ModuleUnsupported(ReleaseRejected):
    """A module this agent cannot run: not a WASI command (no ``_start``), imports the runtime does not
    provide, more memory than the gateway allows, or a predicate the runtime cannot read."""

    code = "module_unsupported"


class KindUnsupported(ReleaseRejected):
    """This agent was built without a runtime for the release's kind, so it cannot say the release can
    run: nothing is stored (an install never keeps what nothing here could load)."""

    code = "kind_unsupported"


class KeysetRejected(ReleaseRejected):
    """A key-set update that is not signed by a root key, replays an old sequence, or is malformed."""

    code = "keyset_rejected"


ALL_CODES: tuple[str, ...] = tuple(c.code for c in (
    Unsigned, BadSignature, UnknownKey, KeyOutOfScope, DigestMismatch, MalformedBundle, MalformedStatement,
    MalformedPredicate, VersionOutOfRange, WrongPredicateType, VersionNotNewer, Expired, NotYetValid, InvalidWasm,
    InvalidOpaBundle, UnsafeArchive, Oversize, AgentTooOld, PolicyUnsupported, ModuleUnsupported))
