"""Audio time is tied to wall time, and re-tied when a live source's clock drifts or drops."""

from __future__ import annotations

from pathlib import Path

import pytest
import zmq

from monitor.outputs.composer import RESYNC_S, Composer, ZmqOutput
from monitor.outputs.publisher import Publisher

RATE = 16000


@pytest.fixture
def sink(tmp_path: Path):  # type: ignore[no-untyped-def]
    context = zmq.Context()
    publisher = Publisher(f"ipc://{tmp_path}/p.sock", sensor_id="s", send_hwm=10,
                          context=context)
    yield Composer([ZmqOutput(publisher)], header=publisher.next_header,
                   give_back=publisher.give_back, sample_rate=RATE, top_k=1, classes=("a",),
                   mel_bands=4, n_mels=64)
    publisher.close()
    context.term()


def test_first_audio_sets_the_anchor(sink: Composer) -> None:
    sink.anchor(0, now=1000.0, caught_up=False)
    assert sink.wall(RATE) == pytest.approx(1001.0)


def test_jitter_below_the_tolerance_is_ignored(sink: Composer) -> None:
    sink.anchor(0, now=1000.0, caught_up=False)
    sink.anchor(10 * RATE, now=1010.0 + RESYNC_S / 2, caught_up=True)
    assert sink.wall(0) == 1000.0 and sink.clock_resyncs == 0


def test_a_drifting_sound_card_clock_is_followed_both_ways(sink: Composer) -> None:
    sink.anchor(0, now=1000.0, caught_up=False)
    # The card delivered 100 ppm fewer samples than a day of wall time: re-tied.
    day = 86400
    sink.anchor(round(day * RATE * (1 - 1e-4)), now=1000.0 + day, caught_up=True)
    assert sink.clock_resyncs == 1
    assert sink.wall(round(day * RATE * (1 - 1e-4))) == pytest.approx(1000.0 + day)
    # And a card running fast pulls the anchor back.
    sink.anchor(round(2 * day * RATE), now=1000.0 + 2 * day - 1.0, caught_up=True)
    assert sink.clock_resyncs == 2
    assert sink.wall(round(2 * day * RATE)) == pytest.approx(1000.0 + 2 * day - 1.0)


def test_dropped_audio_is_a_gap_in_wall_time(sink: Composer) -> None:
    sink.anchor(0, now=1000.0, caught_up=False)
    # A 2 s stall overran the ring: 1 s of audio was dropped. While the backlog drains the
    # anchor stays; once caught up, the newest sample is tied to its arrival time.
    sink.anchor(5 * RATE, now=1006.0, caught_up=False)
    assert sink.wall(5 * RATE) == 1005.0
    sink.anchor(6 * RATE, now=1007.0, caught_up=True)
    assert sink.wall(6 * RATE) == pytest.approx(1007.0)
    assert sink.clock_resyncs == 1
