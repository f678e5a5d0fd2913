"""Agent properties → KubeEdge device twins: naming, local validation and message shapes.

Validation mirrors EdgeCore's (``edge/pkg/devicetwin/dtcommon``): an invalid message is answered
on the *empty-id* error topic with an empty ``event_id``, which cannot be correlated — so nothing
that would fail there is ever published. Values are normalised (no exponent, lowercase booleans).
"""

from __future__ import annotations

import math
import re
import time
import uuid
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from agent import jsonsafe
from agent.config.sync import KubeEdgeDevice, KubeEdgeSettings
from agent.errors import AgentError

TWIN_NAME = re.compile(r"[a-zA-Z0-9\-_.,:/@#]{1,128}")
TWIN_VALUE = re.compile(r"[a-zA-Z0-9\-_.,:/@#]{1,512}")
# Kubernetes object names (RFC 1123 subdomain); also keeps MQTT wildcards out of topics
K8S_NAME = re.compile(r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?")
TWIN_TYPES = ("string", "int", "integer", "float", "boolean")
DEVICE_STATES = ("online", "offline", "ok", "unknown", "unhealthy")

_TYPE_OF = {"float": "float", "double": "float", "number": "float", "real": "float",
            "int": "int", "integer": "int", "long": "int",
            "bool": "boolean", "boolean": "boolean", "string": "string", "str": "string", "text": "string"}


class TwinValueError(AgentError):
    code = "twin_value_invalid"


def twin_type(agent_type: str) -> str:
    return _TYPE_OF.get(agent_type.strip().lower(), "string")


def normalise(value: str, ttype: str) -> str:
    """The twin value for ``value`` of ``ttype``, or TwinValueError saying why EdgeCore would reject it."""
    if ttype == "float":
        try:
            f = float(value)
        except ValueError:
            raise TwinValueError(f"{value!r} is not a number") from None
        if not math.isfinite(f):
            raise TwinValueError(f"{value!r} is not a finite number")
        text = format(Decimal(repr(f)).normalize(), "f")
        return text
    if ttype == "int":
        try:
            d = Decimal(value.strip())
        except ArithmeticError:
            raise TwinValueError(f"{value!r} is not an integer") from None
        if not d.is_finite() or d != d.to_integral_value():
            raise TwinValueError(f"{value!r} is not an integer")
        return str(int(d))
    if ttype == "boolean":
        low = value.strip().lower()
        if low in ("true", "1", "on", "yes"):
            return "true"
        if low in ("false", "0", "off", "no"):
            return "false"
        raise TwinValueError(f"{value!r} is not a boolean (true/false)")
    if value and not TWIN_VALUE.fullmatch(value):
        raise TwinValueError(f"{value[:40]!r} has characters EdgeCore rejects "
                             "(allowed: letters, digits, - _ . , : / @ #; at most 512)")
    return value


def check_name(name: str) -> None:
    if not TWIN_NAME.fullmatch(name):
        raise TwinValueError(f"twin name {name[:40]!r} is not allowed (letters, digits, - _ . , : / @ #; 1..128)")


@dataclass(frozen=True)
class DeviceRef:
    """Where an agent device lives in KubeEdge."""

    agent_device: str
    namespace: str
    name: str
    topic_style: str
    mapping: KubeEdgeDevice

    @property
    def device_id(self) -> str:
        return f"{self.namespace}/{self.name}" if self.topic_style == "v1.17" else self.name

    def topic(self, suffix: str) -> str:
        return f"$hw/events/device/{self.device_id}/{suffix}"

    def twin_name(self, prop: str) -> str | None:
        if prop in self.mapping.properties:
            return self.mapping.properties[prop]
        return None if self.mapping.only_mapped else prop


def k8s_name(agent_device: str) -> str:
    """A Kubernetes-valid default name for an agent device (``line1/Press_A`` → ``line1-press-a``)."""
    return re.sub(r"[^a-z0-9.]+", "-", agent_device.lower()).strip("-.")[:253]


def resolve(settings: KubeEdgeSettings, agent_device: str) -> DeviceRef | None:
    """The KubeEdge device of ``agent_device`` (None if it is not synced); raises if its name is invalid."""
    mapping = settings.devices.get(agent_device)
    if mapping is None:
        if settings.only_listed_devices:
            return None
        mapping = KubeEdgeDevice()
    name = mapping.name or k8s_name(agent_device)
    namespace = mapping.namespace or settings.namespace
    for what, value in (("device name", name), ("namespace", namespace)):
        if not K8S_NAME.fullmatch(value):
            raise TwinValueError(f"{what} {value!r} of agent device {agent_device!r} is not a valid Kubernetes name; "
                                 f"map it under [kubeedge.devices.{agent_device}]")
    return DeviceRef(agent_device, namespace, name, settings.topic_style, mapping)


def ms_now() -> int:
    return int(time.time() * 1000)


def twin_update(twins: dict[str, tuple[str, str]]) -> tuple[str, dict[str, Any]]:
    """A ``twin/update`` message: (event_id, body). ``twins`` maps name -> (value, twin type)."""
    event_id = str(uuid.uuid4())
    body = {"event_id": event_id, "timestamp": ms_now(),
            "twin": {name: {"actual": {"value": value}, "metadata": {"type": ttype}}
                     for name, (value, ttype) in sorted(twins.items())}}
    return event_id, body


def state_update(state: str) -> tuple[str, dict[str, Any]]:
    event_id = str(uuid.uuid4())
    return event_id, {"event_id": event_id, "timestamp": ms_now(), "state": state}


def plain(event_id: str | None = None) -> tuple[str, dict[str, Any]]:
    """Body of a get request (twin/get, membership/get)."""
    eid = event_id or str(uuid.uuid4())
    return eid, {"event_id": eid, "timestamp": ms_now()}


# ---- what EdgeCore sends back: decoded strictly, validated into dataclasses ---------------------------
# Anything on these topics is untrusted: whoever can publish on the gateway's broker can retain a
# message there, and a retained message comes back after every restart. A message that does not
# decode (jsonsafe) or does not have the shape below is a counted reject, never an exception.

ANSWER_LIMITS = jsonsafe.Limits(4 * 1024 * 1024, max_depth=32)  # a membership list of thousands of devices
MAX_DEVICES_LISTED = 100_000


@dataclass(frozen=True)
class MembershipResult:
    """``…/membership/get/result``: the ids of the devices bound to this node (``id``, ``name`` and
    ``namespace/name`` of each listed device, whichever EdgeCore's version fills in)."""

    device_ids: frozenset[str]


@dataclass(frozen=True)
class TwinResult:
    """``…/twin/update/result``: success (``code`` None) or an error code with EdgeCore's reason."""

    event_id: str
    code: int | None
    reason: str


def _device_ids(item: jsonsafe.Fields) -> list[str]:
    ids = [v for v in (item.text("id", None, max_len=512), item.text("name", None, max_len=512)) if v]
    namespace, name = item.text("namespace", None, max_len=512), item.text("name", None, max_len=512)
    if namespace and name:
        ids.append(f"{namespace}/{name}")
    return ids


def parse_membership(payload: bytes) -> MembershipResult:
    """Raise :class:`~agent.jsonsafe.JsonRejected` (its code says why) for anything but a membership answer."""
    doc = jsonsafe.Fields(jsonsafe.loads(payload, ANSWER_LIMITS))
    listed = doc.each("devices", _device_ids, max_items=MAX_DEVICES_LISTED)
    return MembershipResult(frozenset(i for ids in listed for i in ids))


def parse_twin_result(payload: bytes) -> TwinResult:
    """Raise :class:`~agent.jsonsafe.JsonRejected` (its code says why) for anything but a twin update result."""
    doc = jsonsafe.Fields(jsonsafe.loads(payload, ANSWER_LIMITS))
    return TwinResult(event_id=doc.text("event_id", None, max_len=256) or "",
                      code=doc.integer("code", None, lo=0, hi=999),
                      reason=doc.text("reason", None, max_len=2048) or "")


def check_object(payload: bytes) -> None:
    """A notification whose content is not used (``membership/updated``) must still be a JSON object."""
    jsonsafe.Fields(jsonsafe.loads(payload, ANSWER_LIMITS))
