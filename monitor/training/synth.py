"""Synthetic tonal negatives: the alarms, beeps, rings and tones of a ward, labelled `other`.

Real recordings of medical alarms and phones are scarce and the event head must still stay
silent on them, so they are made here from their published patterns, deterministically from a
seed, and placed in real room acoustics (a background bed from the training split,
reverberation, gain) by the caller:

- IEC 60601-1-8 alarm signals: high priority (10 pulses, 3 + 2 + pause + 3 + 2), medium
  (3 pulses), low (1-2 pulses); a fundamental of 150-1000 Hz with at least 4 harmonics,
  pulses of 75-250 ms with 10-20 % rise and fall;
- pulse-oximeter beeps: 50-150 ms tones at the heart rate, pitch falling with saturation;
- telephone cadences (North American 440+480 Hz 2 s on / 4 s off, UK 400+450 Hz double ring,
  European 425 Hz), busy tones, electromechanical bells (tone amplitude-modulated at 20 Hz),
  DTMF digit sequences;
- chimes (inharmonic bell partials with exponential decay), smoke alarms (3.1 kHz, the
  ISO 8201 temporal-three pattern), timer and appliance beeps;
- plain stimuli: sine, square, clipped sine, linear and logarithmic sweeps.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

SAMPLE_RATE = 16000

_Gen = Callable[[np.random.Generator, int], np.ndarray]


def _t(n: int) -> np.ndarray:
    return np.arange(n, dtype=np.float64) / SAMPLE_RATE


def _envelope(n: int, rise: float) -> np.ndarray:
    """Trapezoid with raised-cosine edges of `rise` x n samples (no clicks)."""
    edge = max(1, int(n * rise))
    env = np.ones(n)
    ramp = 0.5 - 0.5 * np.cos(np.linspace(0.0, np.pi, edge))
    env[:edge] = ramp
    env[n - edge:] = ramp[::-1]
    return env


def _harmonic_tone(f0: float, n: int, rng: np.random.Generator, *, harmonics: int) -> np.ndarray:
    t = _t(n)
    out = np.zeros(n)
    for k in range(1, harmonics + 1):
        if f0 * k >= SAMPLE_RATE / 2 - 200:
            break
        out += 10.0 ** (rng.uniform(-15.0, 0.0) / 20.0) * np.sin(2 * np.pi * f0 * k * t
                                                              + rng.uniform(0, 2 * np.pi))
    return out


def _place(total: int, pieces: list[tuple[float, np.ndarray]]) -> np.ndarray:
    """Sum `pieces` (start seconds, signal) into `total` samples, cutting at the end."""
    out = np.zeros(total)
    for start_s, piece in pieces:
        a = int(start_s * SAMPLE_RATE)
        if a >= total:
            continue
        b = min(total, a + piece.shape[0])
        out[a:b] += piece[: b - a]
    return out


def iec_alarm(rng: np.random.Generator, total: int) -> np.ndarray:
    """IEC 60601-1-8 burst of one priority, repeated through the clip."""
    priority = rng.choice(["high", "medium", "low"])
    f0 = rng.uniform(150.0, 1000.0)
    harmonics = int(rng.integers(4, 9))
    pulse_s = rng.uniform(0.075, 0.2) if priority == "high" else rng.uniform(0.125, 0.25)
    gap_s = rng.uniform(0.05, 0.125) if priority == "high" else rng.uniform(0.125, 0.25)
    pulse = _harmonic_tone(f0, int(pulse_s * SAMPLE_RATE), rng, harmonics=harmonics)
    pulse *= _envelope(pulse.shape[0], rng.uniform(0.1, 0.2))
    group = {"high": (3, 2), "medium": (3,), "low": (int(rng.integers(1, 3)),)}[priority]
    pieces, t = [], rng.uniform(0.0, 0.5)
    while t < total / SAMPLE_RATE:
        for count in group:
            for _ in range(count):
                pieces.append((t, pulse))
                t += pulse_s + gap_s
            t += rng.uniform(0.2, 0.5)
        t += {"high": rng.uniform(0.5, 2.5), "medium": rng.uniform(2.5, 5.0),
              "low": rng.uniform(5.0, 15.0)}[priority]
    return _place(total, pieces)


def pulse_oximeter(rng: np.random.Generator, total: int) -> np.ndarray:
    rate_hz = rng.uniform(0.8, 2.2)
    pitch = rng.uniform(400.0, 1000.0)
    dur = rng.uniform(0.05, 0.15)
    pieces, t = [], rng.uniform(0.0, 1.0 / rate_hz)
    while t < total / SAMPLE_RATE:
        n = int(dur * SAMPLE_RATE)
        f = pitch * rng.uniform(0.97, 1.0)
        tone = np.sin(2 * np.pi * f * _t(n))
        if rng.random() < 0.5:
            tone = np.sign(tone) * np.minimum(np.abs(tone) * 3.0, 1.0)
        pieces.append((t, tone * _envelope(n, 0.1)))
        t += 1.0 / rate_hz * rng.uniform(0.95, 1.05)
    return _place(total, pieces)


def telephone(rng: np.random.Generator, total: int) -> np.ndarray:
    """A ringing or busy cadence, or an electromechanical bell."""
    kind = rng.choice(["na", "uk", "eu", "busy", "bell"])
    freqs = {"na": (440.0, 480.0), "uk": (400.0, 450.0), "eu": (425.0,), "busy": (480.0, 620.0),
             "bell": (rng.uniform(600.0, 2500.0),)}[kind]
    on_off = {"na": [(2.0, 4.0)], "uk": [(0.4, 0.2), (0.4, 2.0)], "eu": [(1.0, 4.0)],
              "busy": [(0.5, 0.5)], "bell": [(rng.uniform(1.0, 2.0), rng.uniform(2.0, 4.0))]}[kind]
    pieces, t = [], -rng.uniform(0.0, 3.0)
    while t < total / SAMPLE_RATE:
        for on, off in on_off:
            n = int(on * SAMPLE_RATE)
            tt = _t(n)
            tone = sum(np.sin(2 * np.pi * f * tt) for f in freqs)
            if kind == "bell":
                tone = _harmonic_tone(freqs[0], n, rng, harmonics=6)
                tone *= 0.5 + 0.5 * np.sign(np.sin(2 * np.pi * rng.uniform(16.0, 25.0) * tt))
            elif rng.random() < 0.3:  # cheap ringer: square-ish tone
                tone = np.clip(tone * 4.0, -1.0, 1.0)
            if t + on > 0:
                start = max(t, 0.0)
                cut = int((start - t) * SAMPLE_RATE)
                pieces.append((start, (tone * _envelope(n, 0.02))[cut:]))
            t += on + off
    return _place(total, pieces)


_DTMF_LOW = (697.0, 770.0, 852.0, 941.0)
_DTMF_HIGH = (1209.0, 1336.0, 1477.0, 1633.0)


def dtmf(rng: np.random.Generator, total: int) -> np.ndarray:
    pieces, t = [], rng.uniform(0.0, 0.5)
    while t < total / SAMPLE_RATE:
        for _ in range(int(rng.integers(3, 12))):
            n = int(rng.uniform(0.07, 0.2) * SAMPLE_RATE)
            tt = _t(n)
            tone = (np.sin(2 * np.pi * rng.choice(_DTMF_LOW) * tt)
                    + np.sin(2 * np.pi * rng.choice(_DTMF_HIGH) * tt))
            pieces.append((t, tone * _envelope(n, 0.05)))
            t += n / SAMPLE_RATE + rng.uniform(0.05, 0.15)
        t += rng.uniform(0.5, 2.0)
    return _place(total, pieces)


def chime(rng: np.random.Generator, total: int) -> np.ndarray:
    """Doorbells and nurse-call chimes: bell partials (1, 2.76, 5.40, 8.93) decaying."""
    pieces, t = [], rng.uniform(0.0, 1.0)
    while t < total / SAMPLE_RATE:
        for _ in range(int(rng.integers(1, 4))):
            f0 = rng.uniform(400.0, 1800.0)
            n = int(rng.uniform(0.6, 2.0) * SAMPLE_RATE)
            tt = _t(n)
            decay = rng.uniform(1.5, 5.0)
            tone = sum(a * np.sin(2 * np.pi * f0 * r * tt) * np.exp(-decay * r ** 0.5 * tt)
                       for r, a in ((1.0, 1.0), (2.76, 0.5), (5.40, 0.25), (8.93, 0.12))
                       if f0 * r < SAMPLE_RATE / 2 - 200)
            tone *= _envelope(n, 0.005)
            pieces.append((t, tone))
            t += rng.uniform(0.3, 0.8)
        t += rng.uniform(1.0, 4.0)
    return _place(total, pieces)


def smoke_alarm(rng: np.random.Generator, total: int) -> np.ndarray:
    """Temporal-three pattern (0.5 s on, 0.5 s off, x3, then 1.5 s off) near 3.1 kHz."""
    f = rng.uniform(2900.0, 3400.0)
    pieces, t = [], -rng.uniform(0.0, 4.0)
    n = int(0.5 * SAMPLE_RATE)
    tone = np.sin(2 * np.pi * f * _t(n))
    if rng.random() < 0.5:
        tone = np.clip(tone * 3.0, -1.0, 1.0)
    tone *= _envelope(n, 0.02)
    while t < total / SAMPLE_RATE:
        for _ in range(3):
            if t >= 0:
                pieces.append((t, tone))
            t += 1.0
        t += 1.0
    return _place(total, pieces)


def appliance_beeps(rng: np.random.Generator, total: int) -> np.ndarray:
    """Timers, microwaves, infusion pumps, reversing trucks: trains of 1-4 kHz beeps."""
    f = rng.uniform(1000.0, 4000.0)
    dur = rng.uniform(0.08, 0.6)
    period = dur + rng.uniform(0.08, 1.0)
    n = int(dur * SAMPLE_RATE)
    tone = np.sin(2 * np.pi * f * _t(n))
    if rng.random() < 0.5:
        tone = np.sign(tone)
    tone *= _envelope(n, 0.03)
    pieces, t = [], rng.uniform(0.0, 1.0)
    while t < total / SAMPLE_RATE:
        for _ in range(int(rng.integers(1, 6))):
            pieces.append((t, tone))
            t += period
        t += rng.uniform(0.5, 3.0)
    return _place(total, pieces)


def stimulus(rng: np.random.Generator, total: int) -> np.ndarray:
    """A plain test signal: sine, square, clipped sine or a sweep, steady or gated."""
    kind = rng.choice(["sine", "square", "clipped", "sweep"])
    tt = _t(total)
    if kind == "sweep":
        f0, f1 = sorted(rng.uniform(100.0, 6000.0, size=2))
        dur = total / SAMPLE_RATE
        if rng.random() < 0.5:
            phase = 2 * np.pi * (f0 * tt + (f1 - f0) * tt ** 2 / (2 * dur))
        else:
            k = np.log(f1 / f0) / dur
            phase = 2 * np.pi * f0 * (np.exp(k * tt) - 1.0) / k
        out = np.sin(phase)
    else:
        f = float(np.exp(rng.uniform(np.log(100.0), np.log(4000.0))))
        out = np.sin(2 * np.pi * f * tt)
        if kind == "square":
            out = np.sign(out)
        elif kind == "clipped":
            out = np.clip(out * rng.uniform(2.0, 10.0), -1.0, 1.0)
    if rng.random() < 0.5:  # gated on and off
        period = rng.uniform(0.3, 3.0)
        duty = rng.uniform(0.2, 0.8)
        out *= ((tt % period) < duty * period).astype(np.float64)
    return out


GENERATORS: dict[str, _Gen] = {
    "iec_alarm": iec_alarm, "pulse_oximeter": pulse_oximeter, "telephone": telephone,
    "dtmf": dtmf, "chime": chime, "smoke_alarm": smoke_alarm,
    "appliance_beeps": appliance_beeps, "stimulus": stimulus,
}
"""Every kind of synthetic negative, by name."""


def tonal(kind: str, *, seconds: float, seed: int) -> np.ndarray:
    """(n,) float32 clip of one kind at peak 0.5, deterministic in (kind, seconds, seed)."""
    rng = np.random.default_rng([seed, sorted(GENERATORS).index(kind)])
    total = int(seconds * SAMPLE_RATE)
    x = GENERATORS[kind](rng, total)
    peak = float(np.max(np.abs(x))) if x.size else 0.0
    if peak > 0:
        x = x * (0.5 / peak)
    return x.astype(np.float32)
