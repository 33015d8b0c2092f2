"""Device status of the synthetic world: a short time series of battery, temperature, network and volume.

Each sample has at most one problem, which shapes its series (the battery drains below 15 %, the temperature
climbs past 45 °C, the network signal fades, the volume is muted); the answer says what is wrong and the command a
user would want ("the battery is low: enable power saving."). Values are in their natural units; a builder
normalises them with ``CHANNEL_MEAN`` / ``CHANNEL_STD``.
"""

from __future__ import annotations

import random
import re

CHANNELS = ("battery", "temperature", "network", "volume")  # percent, degrees Celsius, signal 0-1, percent
CHANNEL_MEAN = (50.0, 38.0, 0.5, 50.0)
CHANNEL_STD = (30.0, 8.0, 0.3, 30.0)

STATES = {
    # state -> (description, command)
    "battery_low": ("the battery is low", "enable power saving"),
    "overheating": ("the device is hot", "close background apps"),
    "network_weak": ("the network is weak", "switch to offline mode"),
    "muted": ("the sound is muted", "turn the volume up"),
    "normal": ("everything is normal", "no action needed"),
}


def answer(state: str) -> str:
    description, command = STATES[state]
    return f"{description}: {command}."


def sample_status(rng: random.Random, steps: int = 16) -> tuple[str, list[list[float]]]:
    """(state, [steps][4] readings): a random state and a series that shows it, with noise."""
    state = rng.choice(sorted(STATES))
    battery = _ramp(rng, steps, rng.uniform(30, 95), rng.uniform(20, 60), 1.0)
    temperature = _ramp(rng, steps, rng.uniform(28, 36), rng.uniform(30, 40), 0.5)
    network = _ramp(rng, steps, rng.uniform(0.6, 0.95), rng.uniform(0.55, 0.95), 0.03)
    volume = _ramp(rng, steps, rng.uniform(30, 80), rng.uniform(30, 80), 1.0)
    if state == "battery_low":
        battery = _ramp(rng, steps, rng.uniform(20, 40), rng.uniform(2, 12), 1.0)
    elif state == "overheating":
        temperature = _ramp(rng, steps, rng.uniform(36, 42), rng.uniform(47, 58), 0.5)
    elif state == "network_weak":
        network = _ramp(rng, steps, rng.uniform(0.4, 0.7), rng.uniform(0.02, 0.15), 0.03)
    elif state == "muted":
        cut = rng.randrange(steps // 4, steps // 2)
        volume = volume[:cut] + [0.0] * (steps - cut)
    return state, [[round(v, 3) for v in row] for row in zip(battery, temperature, network, volume)]


def _ramp(rng: random.Random, steps: int, start: float, end: float, noise: float) -> list[float]:
    return [start + (end - start) * i / (steps - 1) + rng.gauss(0, noise) for i in range(steps)]


_COMMANDS = {command: state for state, (_, command) in STATES.items()}
_COMMAND = re.compile("|".join(re.escape(c) for c in sorted(_COMMANDS, key=len, reverse=True)))


def parse_command(text: str) -> str | None:
    """The state whose command a text gives first, or None."""
    found = _COMMAND.search(text.lower())
    return _COMMANDS[found.group(0)] if found else None


def command_report(references: list[str], hypotheses: list[str]) -> dict[str, float]:
    """Share of samples whose generated answer gives the right command (no command found: wrong)."""
    if len(references) != len(hypotheses):
        raise ValueError(f"{len(references)} references but {len(hypotheses)} hypotheses")
    right = 0
    for ref, hyp in zip(references, hypotheses):
        truth = parse_command(ref)
        if truth is None:
            raise ValueError(f"reference answer {ref!r} gives no known command")
        right += parse_command(hyp or "") == truth
    return {"accuracy_command": right / max(len(references), 1)}
