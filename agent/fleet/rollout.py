"""Aggregate gateway statuses of one release into rollout states (what ``edge-fleet rollout`` shows).

Per gateway, for the release kind/name/version V being rolled out:

- ``active``      — it reports V active, or already runs a newer version;
- ``rejected``    — it refused V (reason code + message);
- ``rolled_back`` — it ran V, found it unhealthy and went back by itself (why);
- ``offline``     — its presence topic says offline (last will) and it has not settled V;
- ``pending``     — online (or unknown) and not settled yet; ``--expect N`` adds never-seen gateways here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from agent.fleet.reporter import parse_status
from agent.fleet.topics import Topics

STATES = ("active", "rejected", "rolled_back", "pending", "offline")
SETTLED = ("active", "rejected", "rolled_back")


@dataclass
class GatewayView:
    node_id: str
    presence: str = "unknown"
    status: dict[str, Any] | None = None

    def state_for(self, version: int) -> str:
        st = self.status
        if st is not None:
            if st.get("version") == version and st.get("state") in SETTLED:
                return str(st["state"])
            active = st.get("active_version")
            if isinstance(active, int) and active >= version:
                return "active"
        return "offline" if self.presence == "offline" else "pending"


@dataclass
class Rollout:
    kind: str
    name: str
    version: int
    topics: Topics = field(default_factory=Topics)
    gateways: dict[str, GatewayView] = field(default_factory=dict)

    def filters(self) -> list[str]:
        return [self.topics.status_filter(self.kind, self.name), self.topics.presence_filter()]

    def feed(self, topic: str, payload: bytes) -> bool:
        """Take one status/presence message; True if it changed what we know."""
        node = self.topics.node_of_status(topic)
        if node is None:
            return False
        if topic == self.topics.presence(node):
            gw = self.gateways.setdefault(node, GatewayView(node))
            new = payload.decode(errors="replace") or "unknown"
            changed = gw.presence != new
            gw.presence = new
            return changed
        if topic != self.topics.status(node, self.kind, self.name):
            return False
        status = parse_status(payload)
        gw = self.gateways.setdefault(node, GatewayView(node))
        changed = gw.status != status
        gw.status = status
        return changed

    def relevant(self) -> list[GatewayView]:
        """Gateways that reported about this release line (presence alone does not make one a target)."""
        return [g for g in self.gateways.values() if g.status is not None]

    def counts(self, expect: int | None = None) -> dict[str, int]:
        out = dict.fromkeys(STATES, 0)
        views = self.relevant()
        for gw in views:
            out[gw.state_for(self.version)] += 1
        if expect is not None and expect > len(views):
            out["pending"] += expect - len(views)
        return out

    def settled(self, expect: int | None = None) -> bool:
        counts = self.counts(expect)
        total = sum(counts.values())
        return total > 0 and sum(counts[s] for s in SETTLED) == total

    def rows(self) -> list[dict[str, Any]]:
        out = []
        for gw in sorted(self.relevant(), key=lambda g: g.node_id):
            st = gw.status or {}
            out.append({"node_id": gw.node_id, "state": gw.state_for(self.version), "presence": gw.presence,
                        "reported_version": st.get("version"), "reported_state": st.get("state"),
                        "active_version": st.get("active_version"), "code": st.get("code") or "",
                        "message": st.get("message") or "", "shadow": st.get("shadow")})
        return out


def summary_line(counts: dict[str, int]) -> str:
    return "  ".join(f"{s.replace('_', ' ')}: {counts[s]}" for s in STATES)


def table(rollout: Rollout, expect: int | None = None) -> str:
    rows = rollout.rows()
    lines = [f"{rollout.kind} {rollout.name} v{rollout.version}   {summary_line(rollout.counts(expect))}", ""]
    header = f"{'GATEWAY':<24} {'STATE':<12} {'PRESENCE':<9} {'RUNS':>5} {'SHADOW':>10}  REASON"
    lines.append(header)
    for r in rows:
        shadow = r["shadow"] or {}
        shadow_txt = f"{shadow.get('changed', '-')}/{shadow.get('evaluated', '-')}" if shadow else "-"
        runs = "-" if r["active_version"] is None else str(r["active_version"])
        reason = f"{r['code']}: {r['message']}"[:80] if r["code"] else ""
        lines.append(f"{r['node_id']:<24} {r['state']:<12} {r['presence']:<9} {runs:>5} {shadow_txt:>10}  {reason}")
    return "\n".join(lines)
