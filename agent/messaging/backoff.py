"""Reconnect backoff: the one helper every MQTT link of the agent waits with between attempts.

Capped exponential delays with jitter: attempt ``n`` may wait up to ``d = min(cap, first * 2**n)``.
*Equal* jitter waits a uniform time in ``[d/2, d]`` (a link the agent owns alone: prompt, yet never
two retries in lockstep); *full* jitter waits a uniform time in ``[0, d]`` (the fleet link, where
thousands of gateways lose the same broker at once and must not come back together). Each link decides
when a connection has lasted long enough to start again from the first delay (:meth:`Backoff.reset`).
"""

from __future__ import annotations

import random
from typing import Literal

Jitter = Literal["equal", "full"]
_MAX_DOUBLINGS = 60  # 2**60 times any first delay is past every cap; keeps the float finite


class Backoff:
    def __init__(self, first: float, cap: float, *, jitter: Jitter = "equal", rng: random.Random | None = None) -> None:
        self.first = first
        self.cap = cap
        self.jitter = jitter
        self.attempt = 0
        self._rng = rng or random.Random()

    def ceiling(self, attempt: int) -> float:
        """The longest wait of attempt ``attempt`` (0 = the first retry)."""
        return min(self.cap, self.first * 2.0 ** min(attempt, _MAX_DOUBLINGS))

    def delay(self, attempt: int) -> float:
        """A wait for attempt ``attempt``, drawn with this backoff's jitter."""
        d = self.ceiling(attempt)
        low = 0.0 if self.jitter == "full" else d / 2
        return self._rng.uniform(low, d)

    def next(self) -> float:
        """The wait before the next attempt; the one after it may be twice as long (up to the cap)."""
        d = self.delay(self.attempt)
        self.attempt += 1
        return d

    def reset(self, to: int = 0) -> None:
        """Start again from attempt ``to`` (or stay where it is, if that is earlier): after a connection
        that held (``to=0``), or one that failed soon after connecting (``to=1``)."""
        self.attempt = min(self.attempt, to)
