"""Health-window judgement of a freshly activated policy: pure functions over its counters.

The new release's counters since it went live are compared with the thresholds and with the
latency of the release it replaced; the first rule crossed names the reason for the rollback.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

LATENCY_MIN_EVALS = 200


class StatsLike(Protocol):
    evals: int
    errors: int
    traps: int
    deadline_hits: int
    latency_us: list[int]


@dataclass(frozen=True)
class HealthSample:
    evals: int = 0
    errors: int = 0
    traps: int = 0
    deadline_hits: int = 0
    latency_counts: tuple[int, ...] = ()

    @classmethod
    def of(cls, stats: StatsLike) -> HealthSample:
        return cls(stats.evals, stats.errors, stats.traps, stats.deadline_hits, tuple(stats.latency_us))

    def minus(self, base: HealthSample) -> HealthSample:
        counts = tuple(a - (base.latency_counts[i] if i < len(base.latency_counts) else 0)
                       for i, a in enumerate(self.latency_counts))
        return HealthSample(self.evals - base.evals, self.errors - base.errors, self.traps - base.traps,
                            self.deadline_hits - base.deadline_hits, counts)

    def to_dict(self) -> dict[str, Any]:
        return {"evals": self.evals, "errors": self.errors, "traps": self.traps, "deadline_hits": self.deadline_hits}


@dataclass(frozen=True)
class HealthRules:
    window_s: float = 30.0
    min_evals: int = 20
    max_traps: int = 0
    max_error_rate: float = 0.05
    max_latency_ratio: float = 3.0


def quantile_us(counts: tuple[int, ...], buckets_us: tuple[int, ...] | list[int], q: float) -> float | None:
    """Upper bound (µs) of the bucket holding quantile ``q``; None without samples.

    ``counts[i]`` counts samples <= ``buckets_us[i]``; the last count is the overflow bucket,
    reported as twice the last bound.
    """
    total = sum(counts)
    if total <= 0:
        return None
    rank = q * total
    seen = 0
    for i, n in enumerate(counts):
        seen += n
        if seen >= rank and n > 0:
            return float(buckets_us[i]) if i < len(buckets_us) else float(buckets_us[-1] * 2 if buckets_us else 0)
    return float(buckets_us[-1] * 2) if buckets_us else None


def judge(delta: HealthSample, rules: HealthRules, buckets_us: tuple[int, ...] | list[int],
          baseline_p99_us: float | None) -> tuple[str, str] | None:
    """(code, why) of the first rule crossed by the window so far, or None while healthy."""
    if delta.traps > rules.max_traps:
        return ("health_traps", f"{delta.traps} trap(s) in the health window (tolerated: {rules.max_traps})")
    attempts = delta.evals + delta.errors
    if attempts >= max(1, rules.min_evals):
        failed = delta.errors
        rate = failed / attempts
        if rate > rules.max_error_rate:
            return ("health_errors", f"{failed} of {attempts} evaluations failed ({rate:.1%}; "
                    f"{delta.deadline_hits} deadline hits), more than {rules.max_error_rate:.1%}")
    # a p99 needs samples: below LATENCY_MIN_EVALS one cold start (instance creation) would be "the p99"
    if delta.evals >= max(LATENCY_MIN_EVALS, rules.min_evals) and baseline_p99_us:
        p99 = quantile_us(delta.latency_counts, buckets_us, 0.99)
        if p99 is not None and p99 > rules.max_latency_ratio * baseline_p99_us:
            return ("health_latency", f"p99 latency {p99:.0f} µs is over {rules.max_latency_ratio:g}x the previous "
                    f"release's {baseline_p99_us:.0f} µs")
    return None
