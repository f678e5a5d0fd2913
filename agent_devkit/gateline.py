"""A simulated production line for the audit-trail tests and the outage benchmark: module outputs as the
demo thermostat makes them (a fan command and two properties per device), fed straight to the real
pipeline with the real gate policy, on a simulated clock."""

from __future__ import annotations

import random
from dataclasses import dataclass

from agent.clock import Stamp
from agent.runtime.contract import Actuation, ModuleOutput, Property

WALL0 = 1_780_000_000.0


@dataclass
class SimClock:
    """Simulated time: ``t`` seconds since start → a stamp; ``wall_offset`` models an NTP step, ``boot``
    a reboot (boot clock restarts near 0)."""

    t: float = 0.0
    boot: str = "boot-1"
    mono0: float = 100.0
    wall_offset: float = 0.0

    def __call__(self) -> Stamp:
        return Stamp(WALL0 + self.t + self.wall_offset, self.boot, self.mono0 + self.t)

    def reboot(self, boot: str, down_s: float = 60.0, wall_offset: float = 0.0) -> None:
        self.t += down_s
        self.boot = boot
        self.mono0 = 5.0 - self.t
        self.wall_offset = wall_offset


def device_output(device: str, fan_on: bool, temp: float) -> ModuleOutput:
    """What the thermostat outputs for one device: the fan command and the fan and temp properties."""
    return ModuleOutput(
        name="thermostat", version=1, trigger={"kind": "topic"},
        actuations=[Actuation(f"actuators/{device}/fan", {"fan": "on" if fan_on else "off", "device": device,
                                                          "value": temp})],
        properties=[Property(device, "fan", "on" if fan_on else "off", "string"),
                    Property(device, "temp", temp, "float")])


class Line:
    """``n`` devices; the fan toggles every reading; now and then a temp above the policy's clamp (150)."""

    def __init__(self, n: int, seed: int = 1, hot_every: int = 500) -> None:
        self.devices = [f"line{1 + i // 50}/press{i % 50 + 1}" for i in range(n)]
        self.fan = dict.fromkeys(self.devices, False)
        self.rng = random.Random(seed)
        self.hot_every = hot_every

    def outputs(self) -> list[ModuleOutput]:
        out = []
        for dev in self.devices:
            self.fan[dev] = not self.fan[dev]
            hot = self.hot_every > 0 and self.rng.randrange(self.hot_every) == 0
            temp = round(160.0 + self.rng.random() * 10 if hot else 25.0 + self.rng.random() * 10, 2)
            out.append(device_output(dev, self.fan[dev], temp))
        return out
