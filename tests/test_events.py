"""The event state machine: thresholds, hysteresis, N-of-M, minimum duration, refractory."""

from __future__ import annotations

import pytest

from monitor.detect.events import ClassEventLogic, ClassRule, EventLogic, Transition

STRIDE = 1600  # 100 ms at 16 kHz
WINDOW = 8000


def rule(**changes: float) -> ClassRule:
    values = {"threshold": 0.5, "release": 0.3, "confirm_n": 1, "confirm_m": 1,
              "min_duration": 0, "refractory": 0}
    values.update(changes)
    return ClassRule(**values)  # type: ignore[arg-type]


def feed(logic: ClassEventLogic, scores: list[float], *,
         flush: bool = True) -> list[tuple[str, int, Transition]]:
    """Feed scores at one stride apart; returns (phase, window index, transition)."""
    out = []
    for i, score in enumerate(scores):
        end = WINDOW + i * STRIDE
        t = logic.update(score, end)
        if t is not None:
            out.append((t.phase, i, t))
    if flush:
        out += [(t.phase, len(scores), t) for t in logic.flush(WINDOW + len(scores) * STRIDE)]
    return out


def make(**changes: float) -> ClassEventLogic:
    return ClassEventLogic("fall", rule(**changes), window=WINDOW, stride=STRIDE)


def test_start_then_end_with_peak_and_times() -> None:
    got = feed(make(), [0.1, 0.2, 0.7, 0.9, 0.6, 0.1, 0.1])
    assert [(phase, i) for phase, i, _ in got] == [("start", 2), ("end", 5)]
    start, end = got[0][2], got[1][2]
    assert start.event_number == end.event_number == 1
    assert start.onset == WINDOW + 2 * STRIDE - WINDOW // 2  # models hit mid-window
    assert end.peak_score == pytest.approx(0.9)
    assert end.offset is not None and end.offset >= end.onset


def test_hysteresis_keeps_one_event_while_score_wobbles() -> None:
    # Dips below threshold (0.5) but not below release (0.3) do not end the event.
    got = feed(make(), [0.6, 0.45, 0.55, 0.35, 0.6, 0.2])
    assert [phase for phase, _, _ in got] == ["start", "end"]


def test_without_hysteresis_it_would_flap() -> None:
    got = feed(make(release=0.5), [0.6, 0.45, 0.55, 0.35, 0.6, 0.2])
    assert [phase for phase, _, _ in got] == ["start", "end"] * 3


def test_n_of_m_rejects_isolated_hits() -> None:
    logic = make(confirm_n=2, confirm_m=3)
    assert feed(logic, [0.9, 0.1, 0.1, 0.9, 0.1, 0.1]) == []
    got = feed(make(confirm_n=2, confirm_m=3), [0.9, 0.1, 0.9, 0.8, 0.1])
    assert [(phase, i) for phase, i, _ in got] == [("start", 2), ("end", 4)]
    # The onset is placed at the first hit of the confirming set, not the confirming one.
    assert got[0][2].onset == WINDOW - WINDOW // 2


def every_event_lasts_min_duration(got: list[tuple[str, int, Transition]],
                                   min_duration: int) -> None:
    ends = [t for phase, _, t in got if phase == "end"]
    assert ends
    for t in ends:
        assert t.offset is not None and t.offset - t.onset >= min_duration, t


def test_offset_is_at_least_min_duration_after_onset() -> None:
    # One stride above threshold with a half-window onset lead: the sound-left-the-window
    # offset would lie before the onset; the rule keeps the event min_duration long.
    min_duration = STRIDE
    got = feed(make(min_duration=min_duration), [0.1, 0.9, 0.9, 0.1, 0.1])
    assert [(phase, i) for phase, i, _ in got] == [("start", 2), ("end", 3)]
    every_event_lasts_min_duration(got, min_duration)
    assert got[1][2].offset == got[1][2].onset + min_duration


def test_end_of_stream_publishes_a_confirmed_candidate_short_of_min_duration() -> None:
    logic = make(min_duration=5 * STRIDE)
    got = feed(logic, [0.1, 0.9, 0.9])  # confirmed, 1 stride long, then the stream ends
    assert [(phase, i) for phase, i, _ in got] == [("start", 3), ("end", 3)]
    start, end = got[0][2], got[1][2]
    assert start.event_number == end.event_number == 1 and start.onset == end.onset
    every_event_lasts_min_duration(got, 5 * STRIDE)
    assert logic.suppressed == 0
    # Below release before the end: suppressed as anywhere in a stream.
    logic = make(min_duration=5 * STRIDE)
    assert feed(logic, [0.9, 0.1]) == [] and logic.suppressed == 1


def test_end_of_stream_keeps_n_of_m() -> None:
    # One hit where 2 of 3 are needed is no event, at the end as anywhere.
    assert feed(make(confirm_n=2, confirm_m=3), [0.1, 0.1, 0.9]) == []
    got = feed(make(confirm_n=2, confirm_m=3, min_duration=10 * STRIDE), [0.1, 0.9, 0.9])
    assert [phase for phase, _, _ in got] == ["start", "end"]


def test_swapping_rules_drops_a_candidate_short_of_min_duration() -> None:
    logic = make(min_duration=5 * STRIDE)
    feed(logic, [0.9, 0.9], flush=False)
    assert logic.flush(WINDOW + 2 * STRIDE, decide_pending=False) == []
    assert logic.suppressed == 1


def test_times_stay_within_the_audio_once_its_end_is_known() -> None:
    """Windows scored after the audio ended (the padded tail) place no time past the end."""
    min_duration = 2 * STRIDE
    logic = make(min_duration=min_duration)
    audio_end = WINDOW + STRIDE // 2
    logic.audio_end = audio_end
    # The sound is only in the audio's last samples: padded windows still hold it.
    got = feed(logic, [0.1, 0.1, 0.1, 0.1, 0.9, 0.9, 0.9, 0.1], flush=False)
    got += [(t.phase, 8, t) for t in logic.flush(audio_end)]
    assert [phase for phase, _, _ in got] == ["start", "end"]
    start, end = got[0][2], got[1][2]
    assert end.offset == audio_end and end.offset - start.onset >= min_duration
    logic.reset()
    assert logic.audio_end is None


def test_min_duration_suppresses_short_events_and_counts_them() -> None:
    logic = make(min_duration=3 * STRIDE)
    assert feed(logic, [0.9, 0.9, 0.1, 0.1]) == []
    assert logic.suppressed == 1
    # Measured from the first hit: hits at windows 0..3 have lasted 3 strides at window 3.
    got = feed(make(min_duration=3 * STRIDE), [0.9, 0.9, 0.9, 0.9, 0.1])
    assert [(phase, i) for phase, i, _ in got] == [("start", 3), ("end", 4)]
    assert got[0][2].event_number == 1


def test_refractory_time_blocks_a_quick_repeat() -> None:
    scores = [0.9, 0.1, 0.9, 0.1, 0.1, 0.1, 0.1, 0.9, 0.1]
    without = feed(make(), scores)
    assert [phase for phase, _, _ in without] == ["start", "end"] * 3
    within = feed(make(refractory=3 * STRIDE), scores)
    assert [(phase, i) for phase, i, _ in within] == [("start", 0), ("end", 1),
                                                     ("start", 7), ("end", 8)]
    assert [t.event_number for _, _, t in within] == [1, 1, 2, 2]


def test_hits_inside_the_refractory_time_do_not_confirm_an_event_after_it() -> None:
    # one long sound whose score dips once (the first event ends there), then stays high
    # through the 3-window refractory time and falls: its tail must not confirm a second
    # event, with a low score, the moment the refractory time is over
    scores = [0.9, 0.9, 0.9, 0.1, 0.9, 0.9, 0.9, 0.1, 0.1, 0.1]
    got = feed(make(confirm_n=3, confirm_m=5, refractory=3 * STRIDE), scores)
    assert [(phase, i) for phase, i, _ in got] == [("start", 2), ("end", 3)]
    assert all(t.peak_score >= 0.5 for _, _, t in got)


def test_flush_closes_an_active_event() -> None:
    got = feed(make(), [0.1, 0.9, 0.9])
    assert [(phase, i) for phase, i, _ in got] == [("start", 1), ("end", 3)]
    every_event_lasts_min_duration(got, 0)


def test_reset_forgets_state() -> None:
    logic = make()
    feed(logic, [0.9], flush=False)
    assert logic.active
    logic.reset()
    assert not logic.active


def test_bad_rules_are_refused() -> None:
    with pytest.raises(ValueError, match="release <= threshold"):
        make(release=0.8)
    with pytest.raises(ValueError, match="confirm_n <= confirm_m"):
        make(confirm_n=3, confirm_m=2)


def test_event_logic_routes_scores_by_class_index() -> None:
    logic = EventLogic({"fall": rule(), "cough": rule(threshold=0.8, release=0.5)},
                       ("speech", "cough", "fall"), window=WINDOW, stride=STRIDE)
    got = logic.update([0.9, 0.7, 0.6], WINDOW)
    assert [t.label for t in got] == ["fall"]
    got = logic.update([0.0, 0.9, 0.0], WINDOW + STRIDE)
    assert sorted((t.label, t.phase) for t in got) == [("cough", "start"), ("fall", "end")]
    assert [(t.label, t.phase) for t in logic.flush(WINDOW + 2 * STRIDE)] == [("cough", "end")]
    with pytest.raises(ValueError, match="does not have"):
        EventLogic({"siren": rule()}, ("speech",), window=WINDOW, stride=STRIDE)


def test_onset_lead_comes_from_the_model() -> None:
    logic = ClassEventLogic("fall", rule(), window=WINDOW, stride=STRIDE, onset_lead=STRIDE)
    got = feed(logic, [0.1, 0.9, 0.1])
    assert got[0][2].onset == WINDOW + STRIDE - STRIDE
    capped = ClassEventLogic("fall", rule(), window=WINDOW, stride=STRIDE, onset_lead=10**9)
    assert feed(capped, [0.9, 0.1])[0][2].onset == 0
