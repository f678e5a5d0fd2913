"""in-toto Statement (v1; v0.1 accepted): binds a predicate to the artifact's sha256."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from agent import jsonsafe
from agent.trust.errors import MalformedStatement, VersionOutOfRange

STATEMENT_V1 = "https://in-toto.io/Statement/v1"
STATEMENT_V01 = "https://in-toto.io/Statement/v0.1"
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
# the signed payload: strict JSON, and no duplicate keys above all (two parsers reading two different
# digests or versions out of the same signed bytes is how a signature gets reused)
STATEMENT_LIMITS = jsonsafe.Limits(4 * 1024 * 1024, max_depth=32)


@dataclass(frozen=True)
class Statement:
    type: str
    subject_name: str
    subject_sha256: str
    predicate_type: str
    predicate: Any


def parse_statement(payload: bytes) -> Statement:
    try:
        obj = jsonsafe.loads(payload, STATEMENT_LIMITS)
    except jsonsafe.JsonRejected as exc:
        if exc.code == "json_integer_out_of_range" and exc.path == "$.predicate.version":
            raise VersionOutOfRange(f"predicate.version is past the largest version a gateway can store: {exc}") \
                from None
        raise MalformedStatement(f"the signed payload is not accepted JSON ({exc.code}): {exc}") from None
    if not isinstance(obj, dict):
        raise MalformedStatement("the in-toto statement must be a JSON object")
    st_type = obj.get("_type")
    if st_type not in (STATEMENT_V1, STATEMENT_V01):
        raise MalformedStatement(f"unsupported statement _type {st_type!r}; expected {STATEMENT_V1!r}")
    subjects = obj.get("subject")
    if not isinstance(subjects, list) or not subjects:
        raise MalformedStatement("the statement has no subject (the artifact digest it signs)")
    first = subjects[0]
    if not isinstance(first, dict) or not isinstance(first.get("digest"), dict):
        raise MalformedStatement("subject[0] must be an object with a digest map")
    sha = first["digest"].get("sha256")
    if not isinstance(sha, str) or not _HEX64.match(sha.lower()):
        raise MalformedStatement("subject[0].digest.sha256 is missing or not 64 hex digits")
    name = first.get("name", "")
    ptype = obj.get("predicateType")
    if not isinstance(ptype, str) or not ptype:
        raise MalformedStatement("the statement has no predicateType")
    if "predicate" not in obj:
        raise MalformedStatement("the statement has no predicate")
    return Statement(type=str(st_type), subject_name=str(name) if isinstance(name, str) else "",
                     subject_sha256=sha.lower(), predicate_type=ptype, predicate=obj["predicate"])


def build_statement(subject_name: str, sha256: str, predicate_type: str, predicate: dict[str, Any]) -> bytes:
    obj = {
        "_type": STATEMENT_V1,
        "subject": [{"name": subject_name, "digest": {"sha256": sha256}}],
        "predicateType": predicate_type,
        "predicate": predicate,
    }
    return jsonsafe.dumps(obj).encode()  # what no agent accepts (NaN, 1e400) cannot be signed
