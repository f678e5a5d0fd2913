"""Pure parts of the fleet component: topic scheme, envelope, backoff, health rules, rollout table."""

from __future__ import annotations

import base64
import json
import random
from pathlib import Path

import pytest

from agent.config import load_config
from agent.config.fleet import FleetSettings
from agent.errors import ConfigError
from agent.fleet.envelope import EnvelopeError, decode, encode
from agent.fleet.health import HealthRules, HealthSample, judge, quantile_us
from agent.fleet.link import LinkConfig
from agent.fleet.reporter import ReleaseStatus
from agent.fleet.rollout import Rollout, table
from agent.fleet.topics import Scope, TopicError, Topics, addresses
from agent.messaging.backoff import Backoff

T = Topics()


def test_release_topics_round_trip_and_reject_garbage() -> None:
    for scope in ("all", "site/plant-1", "group/presses", "gw/gw-7"):
        topic = T.release(Scope.parse(scope), "policy", "gate")
        parsed = T.parse_release(topic)
        assert (str(parsed.scope), parsed.kind, parsed.name) == (scope, "policy", "gate")
    assert T.release(Scope("all"), "module", "m") == "edge/v1/releases/all/module/m"
    for bad in ("edge/v1/releases/all/policy", "edge/v1/releases/moon/x/policy/g", "edge/v1/status/gw/presence",
                "edge/v1/releases/site//policy/g"):
        with pytest.raises(TopicError):
            T.parse_release(bad)
    for bad_scope in ("everyone", "site/", "gw/a/b", "group/+"):
        with pytest.raises(TopicError):
            Scope.parse(bad_scope)


def test_a_gateway_subscribes_to_exactly_its_scopes() -> None:
    assert T.release_filters("gw-1", "plant", ("a", "b")) == [
        "edge/v1/releases/all/+/+", "edge/v1/releases/gw/gw-1/+/+", "edge/v1/releases/site/plant/+/+",
        "edge/v1/releases/group/a/+/+", "edge/v1/releases/group/b/+/+"]
    assert addresses(Scope("all"), "gw-1", "", ())
    assert addresses(Scope("gw", "gw-1"), "gw-1", "", ())
    assert not addresses(Scope("gw", "gw-2"), "gw-1", "", ())
    assert addresses(Scope("site", "p"), "gw-1", "p", ())
    assert not addresses(Scope("site", "p"), "gw-1", "", ())  # no site configured: no site releases
    assert addresses(Scope("group", "b"), "gw-1", "", ("a", "b"))
    assert not addresses(Scope("group", "c"), "gw-1", "", ("a", "b"))
    assert T.status("gw-1", "policy", "gate") == "edge/v1/status/gw-1/releases/policy/gate"
    assert T.node_of_status(T.presence("gw-1")) == "gw-1"


def test_envelope_round_trip_and_every_error_has_its_code() -> None:
    art = b"\0asm" + bytes(range(200))
    payload = encode("policy", "gate", 3, art, {"mediaType": "x"})
    env = decode(payload, max_bytes=1 << 20, kind="policy", name="gate")
    assert (env.kind, env.name, env.version, env.artifact, env.bundle) == ("policy", "gate", 3, art, {"mediaType": "x"})
    obj = json.loads(payload)
    cases = {
        "envelope_too_large": payload,
        "envelope_not_json": b"\xff\xfe",
        "envelope_format_unknown": json.dumps({**obj, "format": "v0"}).encode(),
        "envelope_malformed": json.dumps({**obj, "version": 0}).encode(),
        "artifact_not_base64": json.dumps({**obj, "artifact": "***"}).encode(),
        "artifact_digest_mismatch": json.dumps({**obj, "artifact": base64.b64encode(art[:-1]).decode()}).encode(),
        "envelope_topic_mismatch": json.dumps({**obj, "kind": "module"}).encode(),
    }
    for code, data in cases.items():
        with pytest.raises(EnvelopeError) as err:
            decode(data, max_bytes=len(payload) - 1 if code == "envelope_too_large" else 1 << 20,
                   kind="policy", name="gate")
        assert err.value.code == code, (code, str(err.value))
    with pytest.raises(EnvelopeError):
        decode(json.dumps({**obj, "bundle": "not an object"}).encode(), max_bytes=1 << 20)


def test_backoff_is_capped_exponential_with_full_jitter() -> None:
    rng = random.Random(7)
    for attempt in range(12):
        ceiling = min(60.0, 0.5 * 2 ** attempt)
        samples = [Backoff(0.5, 60.0, jitter="full", rng=rng).delay(attempt) for _ in range(300)]
        assert all(0.0 <= s <= ceiling for s in samples)
        # full jitter: spread over the whole range, not bunched at the ceiling (no lockstep)
        assert min(samples) < 0.2 * ceiling and max(samples) > 0.8 * ceiling
    assert Backoff(0.5, 60.0, jitter="full", rng=rng).delay(10_000) <= 60.0


def test_link_config_parses_urls_and_never_shows_the_password() -> None:
    assert LinkConfig("mqtts://h.example", "c").endpoint() == ("h.example", 8883, True)
    assert LinkConfig("mqtt://10.0.0.1:1884", "c").endpoint() == ("10.0.0.1", 1884, False)
    with pytest.raises(ConfigError):
        LinkConfig("http://h", "c").endpoint()
    assert "hunter2" not in repr(LinkConfig("mqtt://h", "c", password="hunter2"))


def test_fleet_settings_validate_url_and_topic_words(tmp_path: Path) -> None:
    cfg = tmp_path / "agent.toml"
    cfg.write_text('[fleet]\nurl = "mqtts://x:8883"\ngroups = ["a"]\nsite = "s"\n')
    ok = load_config(cfg, tmp_path).fleet
    assert ok.url == "mqtts://x:8883" and tuple(ok.groups) == ("a",) and isinstance(ok, FleetSettings)
    for bad in ('url = "tcp://x"', 'site = "a/b"', 'groups = ["x#"]', "health_max_error_rate = 2.0"):
        cfg.write_text(f"[fleet]\n{bad}\n")
        with pytest.raises(ConfigError) as err:
            load_config(cfg, tmp_path)
        assert "fleet." in str(err.value)


def test_health_rules() -> None:
    buckets = (10, 20, 50, 100)
    rules = HealthRules(min_evals=10, max_traps=0, max_error_rate=0.1, max_latency_ratio=2.0)
    healthy = HealthSample(evals=100, latency_counts=(0, 99, 1, 0, 0))
    assert judge(healthy, rules, buckets, baseline_p99_us=20.0) is None
    assert judge(HealthSample(evals=1, errors=1, traps=1), rules, buckets, None)[0] == "health_traps"  # type: ignore[index]
    errors = HealthSample(evals=80, errors=20, deadline_hits=20, latency_counts=(80, 0, 0, 0, 0))
    assert judge(errors, rules, buckets, None)[0] == "health_errors"  # type: ignore[index]
    few = HealthSample(evals=2, errors=2)
    assert judge(few, rules, buckets, None) is None  # too few to judge a rate (no trap)
    slow = HealthSample(evals=300, latency_counts=(0, 0, 0, 150, 150))
    verdict = judge(slow, rules, buckets, baseline_p99_us=20.0)
    assert verdict is not None and verdict[0] == "health_latency"
    # too few samples for a p99: a cold start must not roll a release back
    assert judge(HealthSample(evals=100, latency_counts=(0, 0, 0, 50, 50)), rules, buckets, 20.0) is None
    assert quantile_us((0, 0, 0, 0, 0), buckets, 0.99) is None
    assert quantile_us((0, 0, 0, 0, 5), buckets, 0.5) == 200.0
    base = HealthSample(evals=10, errors=1, traps=1, deadline_hits=0, latency_counts=(1, 2, 3, 4, 0))
    now = HealthSample(evals=15, errors=1, traps=1, deadline_hits=0, latency_counts=(1, 7, 3, 4, 0))
    assert now.minus(base) == HealthSample(5, 0, 0, 0, (0, 5, 0, 0, 0))


def _status(node: str, version: int | None, state: str, active: int | None, code: str = "") -> bytes:
    return ReleaseStatus(node_id=node, kind="policy", name="gate", version=version, state=state,
                         active_version=active, code=code).to_json()


def test_rollout_aggregates_states() -> None:
    r = Rollout("policy", "gate", 5)
    feed = [
        ("a", _status("a", 5, "active", 5)),
        ("b", _status("b", 5, "rejected", 4, "bad_signature")),
        ("c", _status("c", 5, "rolled_back", 4, "health_traps")),
        ("d", _status("d", 5, "verified", 4)),
        ("e", _status("e", 4, "active", 4)),
        ("f", _status("f", 6, "active", 6)),
    ]
    for node, payload in feed:
        assert r.feed(T.status(node, "policy", "gate"), payload)
    assert r.feed(T.presence("e"), b"offline")
    assert not r.feed(T.status("a", "policy", "other"), _status("a", 1, "active", 1))
    assert r.counts() == {"active": 2, "rejected": 1, "rolled_back": 1, "pending": 1, "offline": 1}
    assert r.counts(expect=10)["pending"] == 5
    assert not r.settled()
    text = table(r)
    assert "bad_signature" in text and "health_traps" in text and text.count("\n") >= 8
    done = Rollout("policy", "gate", 5)
    done.feed(T.status("a", "policy", "gate"), _status("a", 5, "active", 5))
    assert done.settled() and not done.settled(expect=2)
