"""`audio-monitor run`: build the live daemon from the configuration and run it to a signal.

The composition root: the detector, the ZeroMQ publishing stack (journal, CURVE, PUB
socket, catch-up), the source (waited for while a microphone is absent), the optional
outputs chosen in `config.yaml` and the daemon that joins them; then signals (SIGTERM
and SIGINT stop, SIGHUP reloads) and the exit status systemd acts on.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Callable

from monitor.config import Config
from monitor.detect.detector import Detector
from monitor.dsp.jit import aot_status
from monitor.outputs.composer import Live, OutputContext, build_outputs
from monitor.outputs.publisher import PublishingStack
from monitor.service.daemon import Daemon, wait_for_source

logger = logging.getLogger(__name__)

EXIT_RESTART = 75  # EX_TEMPFAIL: the audio device needs a new process (systemd restarts it)


def run_daemon(config: Config, *, reload: Callable[[], Config],
               wait_subscriber_s: float = 0.0) -> int:
    """Run until SIGTERM or SIGINT (0), or until the audio device needs a new process (the
    process exits with EXIT_RESTART at once). `reload` re-reads the configuration (SIGHUP).
    Raises MonitorError for a configuration error found at start."""
    detector = Detector(config.model.path, threads=config.model.threads)
    stack = PublishingStack(config)  # journal, CURVE, PUB socket, catch-up server
    publisher = stack.publisher
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    try:  # a microphone that is not there yet is waited for (degraded), never an exit
        source = wait_for_source(config, stop=stop, publisher=publisher)
    except BaseException:
        stack.close()
        raise
    if source is None:
        stack.close()
        return 0
    # Beside ZeroMQ, which numbers and journals every message.
    outputs = build_outputs(config, OutputContext(
        sensor_id=config.sensor_id, state_dir=config.state_dir,
        journal_path=stack.journal.path))
    daemon = Daemon(config, source=source, detector=detector, publisher=publisher,
                    outputs=outputs)
    daemon.reloader = reload
    signal.signal(signal.SIGHUP, lambda *_: daemon.reload_requested.set())
    daemon.sink.start(Live(counters=daemon.counters, state=lambda: daemon.health.state,
                           gauges=daemon.gauges))
    logger.info("publishing on %s as %s; model %s%s; source %s", publisher.bound_endpoint,
                config.sensor_id, detector.card.name,
                " (int8 weights as u8: this CPU's u8 x s8 kernels saturate)"
                if detector.unsigned_int8 else "", source.description)
    logger.info("%s", aot_status())
    if wait_subscriber_s > 0 and not publisher.wait_for_subscriber(wait_subscriber_s):
        logger.warning("no subscriber after %.1f s; starting anyway", wait_subscriber_s)
    try:
        daemon.run(stop)
    finally:
        daemon.sink.close()  # after the final `stopped` status
        stack.close()
    if daemon.restart_required:
        # A normal exit would run PortAudio's teardown, which hangs on the dead stream.
        logging.shutdown()
        os._exit(EXIT_RESTART)
    return 0
