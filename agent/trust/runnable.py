"""Can this gateway actually run a verified release? The install-time half of the runtimes' load checks.

``verify_release`` proves who signed the bytes and that they are well-formed Wasm / an OPA bundle; it
is pure and also runs on the fleet side. This step runs only on the gateway, before anything is
stored, and asks the real runtime of the release's kind — never a copy of its rules. The trust
package knows only the shape of the question: each runtime provides a :class:`RunnableCheck` for its
kind (``PolicyRuntime.check``, ``ModuleRuntime.check``) and the composition root hands them to the
:class:`~agent.trust.releases.ReleaseStore`, so releases depend on no engine.

A check compiles through the precompiled-code cache: on a miss it returns the compiled code so the
release store writes it in the same transaction that stores the release (a rejected release leaves no
cache row behind), and the daemon then loads it without compiling again.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from agent.trust.errors import KindUnsupported

if TYPE_CHECKING:
    from agent.trust.verify import VerifiedRelease


@dataclass(frozen=True)
class Runnable:
    """What a check learned: ``code`` is the serialized compiled module when the cache had none (to be
    stored with the release), bound to the engine ``fingerprint`` that produced it."""

    code: bytes | None
    fingerprint: str


class RunnableCheck(Protocol):
    """Loads the release exactly as the runtime of its kind will; raises the kind's ``ReleaseRejected``
    (``policy_unsupported``, ``module_unsupported``) naming what this agent cannot do. Blocking."""

    def __call__(self, release: VerifiedRelease, artifact: bytes, conn: sqlite3.Connection) -> Runnable: ...


def check_runnable(v: VerifiedRelease, artifact: bytes, conn: sqlite3.Connection,
                   checkers: Mapping[str, RunnableCheck]) -> Runnable:
    """Ask the checker of ``v.kind``; a kind with no runtime here is refused (``kind_unsupported``)."""
    check = checkers.get(v.kind)
    if check is None:
        raise KindUnsupported(f"{v.kind} {v.name} v{v.version}: this agent runs no {v.kind} runtime, so it "
                              f"cannot load the release (it runs: {', '.join(sorted(checkers)) or 'nothing'})")
    return check(v, artifact, conn)
