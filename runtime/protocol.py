"""uvicorn's HTTP protocol with a deadline for request headers (issue 41, M3).

uvicorn closes idle keep-alive connections, but a client that connects and never finishes its
headers holds its connection (and a file descriptor) for ever: a thousand of them made every
request fail under a 1,024-descriptor limit. Here a connection whose headers have not all arrived
HEADER_SECONDS after its first byte (or after it connected) is closed; the body has its own
deadline (runtime.api.BodyLimit).
"""
from __future__ import annotations

import os

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

HEADER_SECONDS = float(os.environ.get("QGMRN_HEADER_SECONDS", "10"))
MAX_CONNECTIONS = 400               # uvicorn answers 503 past this many connections and tasks at once


class HeaderDeadline(HttpToolsProtocol):
    _header_timer = None

    def _arm(self) -> None:
        if self._header_timer is None:
            self._header_timer = self.loop.call_later(HEADER_SECONDS, self._headers_late)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_late(self) -> None:
        self._header_timer = None
        if not self.transport.is_closing():
            self.transport.close()

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        if self.cycle is None or self.cycle.response_complete:      # between requests: new headers
            self._arm()
        super().data_received(data)

    def on_headers_complete(self) -> None:
        self._disarm()
        super().on_headers_complete()

    def connection_lost(self, exc) -> None:
        self._disarm()
        super().connection_lost(exc)
