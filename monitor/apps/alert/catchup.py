"""Catch-up requests to one source in a thread of their own: a source that does not answer
delays only its own sensors' catch-up."""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass
from typing import Any

import zmq

from monitor.apps.alert.config import Source
from monitor.errors import MessageError
from monitor.outputs.catchup import CatchupClient, ReplyHeader


@dataclass
class Page:
    """A catch-up answer for the main thread: header and pairs, or None and why not."""

    sensor_id: str
    after: int
    header: ReplyHeader | None
    pairs: list[list[bytes]]
    error: str | None = None


class CatchupWorker:
    """Catch-up requests to one source, in its own thread: a source that does not answer
    delays only its own sensors' catch-up, never live events or other sources."""

    def __init__(self, source: Source, *, context: zmq.Context[Any]) -> None:
        assert source.catchup is not None
        self.source = source
        self.context = context
        self.results: queue.SimpleQueue[Page] = queue.SimpleQueue()
        self._requests: queue.SimpleQueue[tuple[str, int] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="alert-catchup", daemon=True)
        self._thread.start()

    def ask(self, sensor_id: str, after: int) -> None:
        self._requests.put((sensor_id, after))

    def stop(self) -> None:
        self._requests.put(None)
        self._thread.join(5)

    def _client(self) -> CatchupClient:
        assert self.source.catchup is not None
        return CatchupClient(self.source.catchup, context=self.context,
                             configure=self.source.configure)

    def _run(self) -> None:
        client = self._client()
        try:
            while (request := self._requests.get()) is not None:
                sensor_id, after = request
                try:
                    page = client.fetch(sensor_id, after)
                    error = None if page is not None else "no answer within 2 s"
                except (MessageError, zmq.ZMQError) as err:
                    page, error = None, str(err)
                if page is None:  # a REQ socket is stuck after a lost reply: a fresh one
                    client.close()
                    client = self._client()
                    self.results.put(Page(sensor_id, after, None, [], error))
                else:
                    self.results.put(Page(sensor_id, after, page[0], page[1]))
        finally:
            client.close()
