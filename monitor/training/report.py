"""The held-out evaluation as a report: fixed-width tables, plots and one HTML page."""

from __future__ import annotations

import html
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from monitor.training.dataset import CLASSES, EVENT_CLASSES, SAMPLE_RATE
from monitor.training.head import pr_curve
from monitor.training.streams import ONSET_GAP_S

if TYPE_CHECKING:
    from monitor.training.evaluate import Evaluation

logger = logging.getLogger(__name__)


def write_report(ev: Evaluation, report_dir: Path, *, params: Any) -> list[Path]:
    """metrics.json, PNG plots (when matplotlib is installed) and index.html."""
    report_dir.mkdir(parents=True, exist_ok=True)
    written = [report_dir / "metrics.json"]
    written[0].write_text(json.dumps(ev.metrics, indent=2) + "\n", encoding="utf-8")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed: report without plots")
    else:
        from monitor.dsp.frontend import logmel_of

        fig, ax = plt.subplots(figsize=(5, 4))
        for k, name in enumerate(EVENT_CLASSES):
            _, p, r = pr_curve(ev.clip_scores[:, k], ev.test_cls == k)
            ax.plot(r, p, label=name)
        ax.set(xlabel="recall", ylabel="precision", title="held-out clips (window max)",
               ylim=(0, 1.02))
        ax.legend()
        fig.tight_layout()
        written.append(report_dir / "pr_curves.png")
        fig.savefig(written[-1], dpi=100)
        plt.close(fig)

        fig, ax = plt.subplots(figsize=(5.5, 4))
        ax.imshow(ev.confusion, cmap="Blues")
        ax.set_xticks(range(len(CLASSES) + 1), [*CLASSES, "none"])
        ax.set_yticks(range(len(CLASSES)), CLASSES)
        for (i, j), v in np.ndenumerate(ev.confusion):
            ax.text(j, i, str(v), ha="center", va="center")
        ax.set(xlabel="first event (live chain)", ylabel="true class", title="held-out clips")
        fig.tight_layout()
        written.append(report_dir / "confusion.png")
        fig.savefig(written[-1], dpi=100)
        plt.close(fig)

        seg = (ONSET_GAP_S * 0.5, ONSET_GAP_S * 5.5)
        x = ev.stream[int(seg[0] * SAMPLE_RATE):int(seg[1] * SAMPLE_RATE)]
        mel = logmel_of(x, params)
        fig, ax = plt.subplots(figsize=(11, 3.5))
        ax.imshow(mel.T, origin="lower", aspect="auto", cmap="magma",
                  extent=(seg[0], seg[1], 0, mel.shape[1]))
        colors = dict(zip(EVENT_CLASSES, ("cyan", "lime", "yellow"), strict=True))
        for name, t in ev.true_onsets:
            if seg[0] <= t <= seg[1]:
                ax.axvline(t, color="white", ls="--", lw=1)
                ax.text(t, mel.shape[1] - 6, name, color="white", fontsize=8)
        for e in ev.stream_events:
            if seg[0] <= e.start_s <= seg[1]:
                ax.axvspan(e.start_s, min(e.end_s, seg[1]), color=colors[e.label], alpha=0.3)
                ax.text(e.start_s, 3, f"{e.label} {e.score:.2f}", color=colors[e.label],
                        fontsize=8)
        ax.set(xlabel="s", ylabel="mel band",
               title="onset stream: true onsets (dashed) and live detections (shaded)")
        fig.tight_layout()
        written.append(report_dir / "spectrogram.png")
        fig.savefig(written[-1], dpi=100)
        plt.close(fig)
    images = "".join(f'<p><img src="{p.name}"></p>' for p in written if p.suffix == ".png")
    page = (f"<html><head><meta charset='utf-8'><title>events model report</title></head>"
            f"<body><h1>events model: held-out evaluation</h1>"
            f"<pre>{html.escape(format_table(ev.metrics))}</pre>{images}"
            f"<pre>{html.escape(json.dumps(ev.metrics, indent=2))}</pre></body></html>")
    written.append(report_dir / "index.html")
    written[-1].write_text(page, encoding="utf-8")
    return written


def format_table(m: dict[str, Any]) -> str:
    """The headline numbers as fixed-width tables."""
    lines = [f"split: {m['split']}",
             "class        clips  prec   recall  F1     onset med/p90 s  (detected)"]
    for name in EVENT_CLASSES:
        c, o = m["clip_level"][name], m["onset"][name]
        med, p90 = o["median_abs_s"], o["p90_abs_s"]
        lines.append(f"{name:<12} {c['clips']:>5}  {c['precision']:.3f}  {c['recall']:.3f}   "
                     f"{c['f1']:.3f}  {med if med is not None else '-'}/"
                     f"{p90 if p90 is not None else '-'}  ({o['detected']}/{o['inserted']})")
    lines.append("")
    lines.append("false alarms per hour (events, 95 % upper bound) on held-out streams")
    lines.append("stream       hours   " + "  ".join(f"{n:<18}" for n in EVENT_CLASSES))
    for stream, fa in m["false_alarms_per_hour"].items():
        cells = "  ".join(f"{fa[n]:>6.1f} ({fa['events'][n]}, {fa['upper_95_per_hour'][n]})"
                          .ljust(18) for n in EVENT_CLASSES)
        lines.append(f"{stream:<12} {fa['stream_hours']:>6.3f}  {cells}")
        if "louder" in fa:
            louder = fa["louder"]
            cells = "  ".join(f"{louder[n]:>6.1f} ({louder['events'][n]})".ljust(18)
                              for n in EVENT_CLASSES)
            lines.append(f"{' +10 dB':<12} {louder['stream_hours']:>6.3f}  {cells}")
    lines.append("")
    lines.append("per source: share of held-out clips raising each class")
    for source, rows in m["per_source"].items():
        for cls, row in rows.items():
            shares = "  ".join(f"{n} {row[n]:.3f}" for n in EVENT_CLASSES)
            lines.append(f"{source:<20} {cls:<12} {row['clips']:>5}  {shares}")
    lines.append("")
    lines.append("recall with a background (held-out events mixed into held-out audio)")
    for name, by_snr in m.get("recall_in_background", {}).items():
        for snr, by_cls in by_snr.items():
            shares = "  ".join(f"{n} {by_cls.get(n, 0.0):.3f}" for n in EVENT_CLASSES)
            lines.append(f"{name:<12} {snr:>6}  {shares}")
    lines.append("recall in other rooms and microphones (held-out events played through them)")
    for chain, by_cls in m.get("recall_in_rooms", {}).items():
        shares = "  ".join(f"{n} {by_cls.get(n, 0.0):.3f}" for n in EVENT_CLASSES)
        lines.append(f"{chain:<19} {shares}")
    lat = m["inference_ms_1_thread"]
    lines.append(f"inference per window, 1 thread: median {lat['median']} ms, "
                 f"p99 {lat['p99']} ms")
    return "\n".join(lines)
