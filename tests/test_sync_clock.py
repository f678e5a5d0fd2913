"""agent.clock: ages and wall-time estimates that survive clock jumps (used by the outbox)."""

from __future__ import annotations

from agent.clock import BootSpan, Stamp, age, best_wall, downtime

W = 1_780_000_000.0


def test_same_boot_age_ignores_the_wall_clock() -> None:
    rec = Stamp(W, "b1", 100.0)
    assert age(rec, Stamp(W - 10 * 86_400, "b1", 160.0), {}) == 60.0  # wall stepped back 10 days
    assert age(rec, Stamp(W + 99 * 86_400, "b1", 160.0), {}) == 60.0  # and forward 99 days


def test_earlier_boot_counts_downtime_only_with_set_clocks() -> None:
    spans = {"b1": BootSpan("b1", W + 50, 150.0)}
    rec = Stamp(W, "b1", 100.0)
    # RTC-backed boot 2 started 1000 s after b1 was last seen; 20 s of uptime
    assert age(rec, Stamp(W + 50 + 1000 + 20, "b2", 20.0), spans) == 50 + 1000 + 20
    # boot 2 in 1970: the downtime is unknown and counted as 0 (never expire early)
    assert age(rec, Stamp(20.0, "b2", 20.0), spans) == 50 + 20
    assert downtime(spans["b1"], Stamp(20.0, "b2", 20.0)) == 0.0


def test_best_wall_rederives_records_stamped_before_ntp() -> None:
    rec = Stamp(30.0, "b2", 30.0)  # stamped in 1970
    fixed = best_wall(rec, Stamp(W, "b2", 130.0))  # NTP set the clock 100 s later
    assert fixed == W - 100
    assert best_wall(rec, Stamp(W, "b3", 5.0)) is None  # another boot, no plausible wall: unknown
