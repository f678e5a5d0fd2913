"""The fleet topic scheme (documented in docs/fleet.md, "Topic scheme").

::

    {prefix}/releases/all/{kind}/{name}                 release for every gateway (retained)
    {prefix}/releases/site/{site}/{kind}/{name}         release for one site (retained)
    {prefix}/releases/group/{group}/{kind}/{name}       release for one group (retained)
    {prefix}/releases/gw/{node_id}/{kind}/{name}        release for one gateway (retained)
    {prefix}/status/{node_id}/presence                  "online" / "offline" (retained, last will)
    {prefix}/status/{node_id}/releases/{kind}/{name}    the gateway's status of that release (retained)
    {prefix}/desired/{scope}                            registry doorbell: new desired state (docs/registry.md)

Gateways only read ``releases/...`` and only write below ``status/{their node id}/`` — the broker's
ACL (``configs/mosquitto-fleet.acl``) enforces it.
"""

from __future__ import annotations

from dataclasses import dataclass

from agent.errors import AgentError

KINDS = ("policy", "module")
SCOPE_KINDS = ("all", "site", "group", "gw")
DEFAULT_PREFIX = "edge/v1"


class TopicError(AgentError):
    """A topic or scope does not follow the fleet topic scheme."""

    code = "topic_invalid"


def check_word(value: str, what: str) -> str:
    """One topic level: non-empty, no separators or wildcards."""
    if not value or any(c in value for c in "/+#\x00"):
        raise TopicError(f"{what} {value!r} cannot be used in a topic (empty, or contains '/', '+', '#')")
    return value


@dataclass(frozen=True)
class Scope:
    """Who a release is for: ``all``, ``site/<s>``, ``group/<g>`` or ``gw/<node_id>``."""

    kind: str
    value: str = ""

    @classmethod
    def parse(cls, text: str) -> Scope:
        if text == "all":
            return cls("all")
        head, _, value = text.partition("/")
        if head not in ("site", "group", "gw") or not value:
            raise TopicError(f"target {text!r} is not a scope: use all, site/<site>, group/<group> or gw/<node-id>")
        return cls(head, check_word(value, f"{head} name"))

    def __str__(self) -> str:
        return "all" if self.kind == "all" else f"{self.kind}/{self.value}"


@dataclass(frozen=True)
class ReleaseTopic:
    scope: Scope
    kind: str
    name: str


@dataclass(frozen=True)
class Topics:
    """Topic names for one prefix (and one gateway, for the status topics)."""

    prefix: str = DEFAULT_PREFIX

    def release(self, scope: Scope, kind: str, name: str) -> str:
        return f"{self.prefix}/releases/{scope}/{check_word(kind, 'kind')}/{check_word(name, 'name')}"

    def release_filters(self, node_id: str, site: str, groups: tuple[str, ...] | list[str]) -> list[str]:
        """What a gateway subscribes to: exactly the scopes that address it."""
        return [f"{self.prefix}/releases/{s}/+/+" for s in gateway_scopes(node_id, site, groups)]

    def doorbell_filters(self, node_id: str, site: str, groups: tuple[str, ...] | list[str]) -> list[str]:
        """The registry doorbells a gateway listens to (``{prefix}/desired/{scope}``, docs/registry.md)."""
        return [f"{self.prefix}/desired/{s}" for s in gateway_scopes(node_id, site, groups)]

    def parse_release(self, topic: str) -> ReleaseTopic:
        """Split a release topic; raises :class:`TopicError` if it is not one."""
        head = f"{self.prefix}/releases/"
        if not topic.startswith(head):
            raise TopicError(f"{topic!r} is not a release topic (expected {head}...)")
        parts = topic[len(head):].split("/")
        if len(parts) == 3 and parts[0] == "all":
            scope = Scope("all")
        elif len(parts) == 4 and parts[0] in ("site", "group", "gw") and parts[1]:
            scope = Scope(parts[0], parts[1])
        else:
            raise TopicError(f"{topic!r} does not name a scope/kind/name")
        kind, name = parts[-2], parts[-1]
        if not kind or not name:
            raise TopicError(f"{topic!r} has an empty kind or name")
        return ReleaseTopic(scope, kind, name)

    def presence(self, node_id: str) -> str:
        return f"{self.prefix}/status/{node_id}/presence"

    def presence_filter(self) -> str:
        return f"{self.prefix}/status/+/presence"

    def status(self, node_id: str, kind: str, name: str) -> str:
        return f"{self.prefix}/status/{node_id}/releases/{kind}/{name}"

    def status_filter(self, kind: str, name: str) -> str:
        return f"{self.prefix}/status/+/releases/{kind}/{name}"

    def node_of_status(self, topic: str) -> str | None:
        head = f"{self.prefix}/status/"
        if not topic.startswith(head):
            return None
        node, _, _rest = topic[len(head):].partition("/")
        return node or None


def gateway_scopes(node_id: str, site: str, groups: tuple[str, ...] | list[str]) -> list[Scope]:
    """The scopes that address one gateway: all, its node id, its site, its groups."""
    scopes = [Scope("all"), Scope("gw", node_id)]
    if site:
        scopes.append(Scope("site", site))
    scopes.extend(Scope("group", g) for g in groups)
    return scopes


def addresses(scope: Scope, node_id: str, site: str, groups: tuple[str, ...] | list[str]) -> bool:
    """Whether a release for ``scope`` is meant for this gateway (defence in depth: the filters
    already select, but a wildcard subscription or a shared broker session could deliver more)."""
    if scope.kind == "all":
        return True
    if scope.kind == "gw":
        return scope.value == node_id
    if scope.kind == "site":
        return bool(site) and scope.value == site
    return scope.value in groups
