"""Event logic: a pure state machine per class (no I/O, no clock; time in samples).

Each scored window gives a class score and the sample position where the window
ends. A class starts an event when ``confirm_n`` of its last ``confirm_m`` scores
reach ``threshold`` (N-of-M confirmation against one-window false alarms) and it
has lasted ``min_duration`` samples; it ends when the score falls below
``release`` (hysteresis, so a score wobbling around the threshold does not flap).
After an end, the class is quiet for ``refractory`` samples: its windows there count as no
hit, so the tail of the sound that just ended cannot confirm a new event.

Reported times: the onset is placed ``onset_lead`` before the end of the first hit
window of the confirming set, the offset where the sound left the last window that
stayed above ``release``; every published event has ``offset - onset >= min_duration``
(the offset is moved later if need be).

End of stream: the processor first scores every window that holds real audio (the
tail padded with silence, see `Processor.finish`), then calls `flush`. The rule for
what is pending then: a candidate that met its N-of-M confirmation and has not fallen
below ``release`` is published (start, then end) even if the audio ended before
``min_duration`` was reached; hits that never met N-of-M are not. Times are kept within
the audio where they can be: with ``audio_end`` set, an onset lies at most
``min_duration`` before it and an offset not after it.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


@dataclass(frozen=True)
class ClassRule:
    """Resolved rule of one class, every duration in samples at the front-end rate."""

    threshold: float
    release: float
    confirm_n: int
    confirm_m: int
    min_duration: int
    refractory: int


@dataclass(frozen=True)
class Transition:
    """An event starting or ending, in audio time (samples)."""

    label: str
    event_number: int
    """Counts events of this class from 1; start and end of one event share it."""
    phase: str
    """"start" or "end"."""
    onset: int
    offset: int | None
    peak_score: float
    threshold: float
    machine: str | None = None
    """The watched machine, for `machine_fault` transitions."""


class _State(Enum):
    IDLE = 0
    PENDING = 1  # confirmed hits, waiting for min_duration
    ACTIVE = 2   # start published, waiting for the score to fall below release


class ClassEventLogic:
    """State machine of one class; `update` is called once per scored window."""

    def __init__(self, label: str, rule: ClassRule, *, window: int, stride: int,
                 onset_lead: int | None = None) -> None:
        """`window` and `stride` are the scored window's length and step in samples: they
        place offsets (a window ending at `end` holds audio from `end - window`).
        `onset_lead` is how far before the end of the first hit window the sound typically
        began: models score a sound best when it sits mid-window, so the default is half
        a window."""
        if not 0.0 <= rule.release <= rule.threshold <= 1.0:
            raise ValueError(f"{label}: need 0 <= release <= threshold <= 1, got {rule}")
        if not 1 <= rule.confirm_n <= rule.confirm_m:
            raise ValueError(f"{label}: need 1 <= confirm_n <= confirm_m, got {rule}")
        self.label = label
        self.rule = rule
        self.window = window
        self.stride = stride
        self.onset_lead = window // 2 if onset_lead is None else min(onset_lead, window)
        self._hits = [False] * rule.confirm_m
        self._hit_ends = [0] * rule.confirm_m
        self.audio_end: int | None = None
        """Sample where the stream's audio ended, once known (set before the padded tail
        is scored); onsets and offsets are kept before it. None while the stream runs."""
        self.reset()

    def reset(self) -> None:
        """Forget all state (a new stream)."""
        self._state = _State.IDLE
        self._cursor = 0
        for i in range(self.rule.confirm_m):
            self._hits[i] = False
        self._onset = 0
        self._first_hit = 0
        self._last_above_release = 0
        self._peak = 0.0
        self._quiet_until = -1
        self._events = 0
        self.audio_end = None
        self.suppressed = 0
        """Confirmed candidates that ended before min_duration (counted, not published)."""

    @property
    def active(self) -> bool:
        return self._state is not _State.IDLE

    def update(self, score: float, end: int) -> Transition | None:
        """Feed the score of the window ending at sample `end`; returns a transition or None."""
        rule = self.rule
        # A window inside the refractory period is no hit: hits counted there would confirm
        # a new event from the tail of the one that just ended once the period is over.
        hit = score >= rule.threshold and end >= self._quiet_until
        self._hits[self._cursor] = hit
        self._hit_ends[self._cursor] = end
        self._cursor = (self._cursor + 1) % rule.confirm_m
        if self._state is _State.IDLE:
            return self._maybe_confirm(score, end)
        if score >= rule.release:
            self._last_above_release = end
            self._peak = max(self._peak, score)
            if self._state is _State.PENDING and end - self._first_hit >= rule.min_duration:
                self._state = _State.ACTIVE
                return self._transition("start", None)
            return None
        return self._finish(end)

    def flush(self, end: int, *, decide_pending: bool = True) -> list[Transition]:
        """The stream ended at sample `end` (every window holding its audio was scored):
        close an active event; a confirmed candidate still short of `min_duration` is
        published, start then end (module docstring). With `decide_pending=False` (rules
        swapped mid-stream) such a candidate is dropped and counted in `suppressed`."""
        if self._state is _State.IDLE:
            return []
        out = []
        if self._state is _State.PENDING and decide_pending:
            self._state = _State.ACTIVE
            out.append(self._transition("start", None))
        transition = self._finish(end)
        if transition is not None:
            out.append(transition)
        return out

    def _maybe_confirm(self, score: float, end: int) -> Transition | None:
        rule = self.rule
        if end < self._quiet_until or sum(self._hits) < rule.confirm_n:
            return None
        first_hit_end = min(e for e, h in zip(self._hit_ends, self._hits, strict=True) if h)
        self._first_hit = first_hit_end
        onset = first_hit_end - self.onset_lead
        if self.audio_end is not None:  # a padded window: the sound lies in the audio
            onset = min(onset, self.audio_end - rule.min_duration)
        self._onset = max(0, onset)
        self._peak = score
        self._last_above_release = end
        self._state = _State.PENDING
        self._events += 1
        if end - self._first_hit >= rule.min_duration:
            self._state = _State.ACTIVE
            return self._transition("start", None)
        return None

    def _finish(self, end: int) -> Transition | None:
        was_active = self._state is _State.ACTIVE
        self._state = _State.IDLE
        for i in range(self.rule.confirm_m):
            self._hits[i] = False
        # The next window (ending one stride later) fell below release: the sound had left it.
        offset = min(end, self._last_above_release - self.window + self.stride)
        if self.audio_end is not None:
            offset = min(offset, self.audio_end)
        offset = max(offset, self._onset + self.rule.min_duration)
        self._quiet_until = end + self.rule.refractory
        if not was_active:
            self.suppressed += 1
            self._events -= 1
            return None
        return self._transition("end", offset)

    def _transition(self, phase: str, offset: int | None) -> Transition:
        return Transition(label=self.label, event_number=self._events, phase=phase,
                          onset=self._onset, offset=offset, peak_score=self._peak,
                          threshold=self.rule.threshold)


class EventLogic:
    """The state machines of every watched class, fed one score vector per window."""

    def __init__(self, rules: dict[str, ClassRule], classes: tuple[str, ...], *,
                 window: int, stride: int, onset_lead: int | None = None) -> None:
        unknown = sorted(set(rules) - set(classes))
        if unknown:
            raise ValueError(f"rules for classes the model does not have: {unknown}")
        self._watched = [(classes.index(name), ClassEventLogic(name, rule, window=window,
                                                            stride=stride,
                                                            onset_lead=onset_lead))
                         for name, rule in rules.items()]

    @property
    def labels(self) -> list[str]:
        return [logic.label for _, logic in self._watched]

    @property
    def suppressed(self) -> int:
        return sum(logic.suppressed for _, logic in self._watched)

    def reset(self) -> None:
        for _, logic in self._watched:
            logic.reset()

    def set_audio_end(self, end: int) -> None:
        """The stream's audio ended at sample `end`; windows scored from now on are padding
        (see `ClassEventLogic.audio_end`)."""
        for _, logic in self._watched:
            logic.audio_end = end

    def update(self, scores: object, end: int) -> list[Transition]:
        """`scores` is the model's score vector (indexable by class index)."""
        out = []
        for index, logic in self._watched:
            transition = logic.update(float(scores[index]), end)  # type: ignore[index]
            if transition is not None:
                out.append(transition)
        return out

    def flush(self, end: int, *, decide_pending: bool = True) -> list[Transition]:
        """End of stream at sample `end`: see `ClassEventLogic.flush`."""
        out = []
        for _, logic in self._watched:
            out.extend(logic.flush(end, decide_pending=decide_pending))
        return out
