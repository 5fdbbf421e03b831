"""The never-trained-on sound set (`monitor.training.unseen`): which package files it takes,
and its counts through the real `analyze` chain."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from monitor.training.unseen import (
    DESCRIPTIONS_KEPT,
    PACKAGES,
    UnseenClip,
    judge,
    main,
    summarise,
    table,
    unseen_clips,
)

REPO = Path(__file__).resolve().parents[1]
EVENTS = REPO / "models" / "events.onnx"


def _listing() -> dict[str, list[Path]]:
    tux = Path("/usr/share/tuxpaint/stamps/animals")
    hw = Path("/usr/share/games/hedgewars/Data/Sounds")
    files = {p: [] for p in PACKAGES}
    files["asterisk-core-sounds-en-wav"] = [Path("/usr/share/asterisk/sounds/en/hello.wav"),
                                            Path("/usr/share/doc/asterisk/copyright")]
    files["tuxpaint-stamps-default"] = [tux / "cow.ogg", tux / "cow_desc_fr.ogg",
                                        tux / "glass.ogg", tux / "cow.png"]
    files["tuxpaint-stamps-default"] += [tux / f"s{i:04d}_desc_en.ogg" for i in range(1500)]
    files["hedgewars-data"] = [hw / "voices/Default/Laugh.ogg",
                               hw / "voices/Default/PoisonCough.ogg", hw / "bee.ogg",
                               hw / "grenadeimpact.ogg", Path("/usr/share/hedgewars/Music/m.ogg")]
    files["sound-theme-freedesktop"] = [Path("/usr/share/sounds/freedesktop/stereo/bell.oga")]
    return files


def test_clips_are_audio_files_by_group_with_event_like_effects_left_out() -> None:
    listing = _listing()
    clips = unseen_clips(lambda package: listing[package])
    by_source: dict[str, list[str]] = {}
    for c in clips:
        by_source.setdefault(c.source, []).append(c.path.name)
    assert by_source["asterisk-en"] == ["hello.wav"]  # the copyright file is not audio
    assert by_source["tuxpaint-effects"] == ["cow.ogg"]  # glass.ogg left out, png skipped
    assert by_source["hedgewars-voices"] == ["Laugh.ogg"]  # PoisonCough left out
    assert by_source["hedgewars-effects"] == ["bee.ogg"]  # an impact left out, music not
    assert by_source["sound-theme-freedesktop"] == ["bell.oga"]
    desc = by_source["tuxpaint-descriptions"]
    assert len(desc) == DESCRIPTIONS_KEPT and len(set(desc)) == DESCRIPTIONS_KEPT
    assert desc == sorted(desc)
    again = unseen_clips(lambda package: listing[package])
    assert [c.path for c in again] == [c.path for c in clips]  # the sample is fixed
    groups = {c.source: c.group for c in clips}
    assert groups["asterisk-en"] == groups["tuxpaint-descriptions"] == "speech"
    assert groups["hedgewars-voices"] == "vocal" and groups["sound-theme-freedesktop"] == "alerts"


def test_summary_counts_clips_events_and_hours() -> None:
    clips = [UnseenClip(Path(f"{i}.wav"), "a", "speech") for i in range(3)]
    clips.append(UnseenClip(Path("x.wav"), "b", "sfx"))
    results = [(["cough", "cough"], 1800.0, None), ([], 1800.0, None), (["fall"], 0.0, "bad"),
               (["glass_break"], 3600.0, None)]
    summary = summarise(clips, results)
    speech = summary["speech/a"]
    assert speech["clips"] == 3 and speech["hours"] == 1.0 and speech["errors"] == 1
    assert speech["clips_raising"] == {"cough": 1, "fall": 1, "glass_break": 0}
    assert speech["events_per_hour"] == {"cough": 2.0, "fall": 1.0, "glass_break": 0.0}
    assert summary["all"]["clips"] == 4 and summary["all"]["hours"] == 2.0
    assert summary["sfx"]["events"]["glass_break"] == 1
    assert "| **all** | 4 | 1 | 2.00 |" in table(summary)


@pytest.mark.skipif(not EVENTS.is_file(), reason="models/events.onnx not composed")
def test_judge_runs_the_analyze_chain_on_each_clip(tmp_path: Path) -> None:
    t = np.arange(3 * 16000) / 16000
    quiet = tmp_path / "hum.wav"
    sf.write(quiet, (0.05 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), 16000)
    broken = tmp_path / "broken.wav"
    broken.write_bytes(b"RIFF0000WAVE")
    clips = [UnseenClip(quiet, "t", "alerts"), UnseenClip(broken, "t", "alerts")]
    (labels, seconds, error), (_, _, broken_error) = judge(clips, processes=1)
    assert labels == [] and error is None and seconds == pytest.approx(3.0, abs=0.05)
    assert broken_error is not None


def test_a_file_under_several_names_counts_once(tmp_path: Path) -> None:
    theme = tmp_path / "stereo"
    theme.mkdir()
    sf.write(theme / "bell.oga", np.zeros(1600, np.float32), 16000, format="OGG")
    (theme / "dialog-warning.oga").symlink_to(theme / "bell.oga")
    (theme / "words.opus").write_bytes(b"")  # any suffix libsndfile reads is audio
    listing = {p: [] for p in PACKAGES}
    listing["sound-theme-freedesktop"] = sorted(theme.iterdir())
    clips = unseen_clips(lambda package: listing[package])
    assert [c.path.name for c in clips] == ["bell.oga", "words.opus"]


def test_bad_arguments_fail_at_start_with_one_line(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--json", str(tmp_path / "no" / "such" / "u.json")]) == 2
    assert "no folder" in capsys.readouterr().err
    assert main(["--models-dir", str(tmp_path)]) == 2  # no model there: no worker is started
    err = capsys.readouterr().err
    assert err.startswith("model:") and err.count("\n") == 1
