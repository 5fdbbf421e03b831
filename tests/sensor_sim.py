"""A sensor that speaks the daemon's protocol without audio: the real Publisher, journal and
catch-up server, publishing `--events` Cough events and `status` heartbeats. Run as a
process by the alerting and fleet tests (`python tests/sensor_sim.py ...`)."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from monitor.outputs.catchup import CatchupServer
from monitor.outputs.journal import Journal
from monitor.outputs.publisher import Publisher
from monitor.protocol.messages import Event, Status


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--state", type=Path, required=True)
    parser.add_argument("--sensor", required=True)
    parser.add_argument("--publish", required=True)
    parser.add_argument("--catchup", required=True)
    parser.add_argument("--events", type=int, default=100)
    parser.add_argument("--rate", type=float, default=200.0, help="events per second")
    parser.add_argument("--status-interval", type=float, default=0.3)
    parser.add_argument("--run", default="r", help="prefix of event ids (one per run)")
    parser.add_argument("--start-after", type=float, default=0.0)
    args = parser.parse_args()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    journal = Journal(args.state / "journal.db", max_age_days=1, max_mb=64)
    publisher = Publisher(args.publish, sensor_id=args.sensor, send_hwm=100000, journal=journal)
    catchup = CatchupServer(args.catchup, journal_path=journal.path, sensor_ids=(args.sensor,))
    catchup.start()
    print("ready", publisher.bound_endpoint, catchup.bound_endpoint, flush=True)
    started = time.monotonic()

    def status(state: str) -> None:
        publisher.publish(Status, state=state, source="sim", uptime_s=time.monotonic() - started,
                          t_audio_s=0.0, counters={"events": sent}, inference_ms_p50=0.0,
                          inference_ms_max=0.0, dc_offset=0.0, last_error=None)

    sent = 0
    next_status = 0.0
    stop.wait(args.start_after)
    t0 = time.monotonic()
    while not stop.is_set():
        now = time.monotonic()
        if now >= next_status:
            status("running")
            next_status = now + args.status_interval
        if sent < args.events:
            due = t0 + sent / args.rate
            if now >= due:
                wall = time.time()
                publisher.publish(Event, event_id=f"{args.run}-{args.sensor}-{sent}",
                                  label="Cough", phase="start", onset_s=0.0, offset_s=None,
                                  onset_time=wall, offset_time=None, peak_score=0.9,
                                  threshold=0.5)
                sent += 1
                continue
            stop.wait(min(due - now, 0.01))
        else:
            stop.wait(0.02)
    status("stopped")
    catchup.stop()
    publisher.close()
    journal.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
