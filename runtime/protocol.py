"""uvicorn's HTTP protocol with a deadline for request headers (issue 41, M3).

uvicorn closes idle keep-alive connections, but a client that connects and never finishes its
headers holds its connection (and a file descriptor) for ever: a thousand of them made every
request fail under a 1,024-descriptor limit. Here a connection whose headers have not all arrived
HEADER_SECONDS after its first byte (or after it connected) is closed; the body has its own
deadline (runtime.api.BodyLimit).
"""
from __future__ import annotations

import math
import os
from collections import OrderedDict

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

HEADER_ENV = "QGMRN_HEADER_SECONDS"


def header_seconds(default: float = 10.0) -> float:
    """HEADER_ENV as a positive number of seconds; ValueError in one line for anything else."""
    raw = os.environ.get(HEADER_ENV)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{HEADER_ENV}={raw[:20]!r} is not a positive number of seconds")
    return value


try:
    HEADER_SECONDS = header_seconds()
except ValueError:                   # runtime.serve.main names the problem before it serves
    HEADER_SECONDS = 10.0
MAX_CONNECTIONS = 400               # uvicorn answers 503 past this many connections and tasks at once
# uvicorn counts every open connection against MAX_CONNECTIONS, also those that have sent nothing:
# 420 silent sockets locked every client out. Connections still waiting for their headers are
# capped at MAX_PENDING; past it the one that has waited longest is closed (an honest client sends
# its headers within milliseconds of connecting, so it is never the oldest), and there is always
# room for connections that ask something.
MAX_PENDING = MAX_CONNECTIONS // 2
_PENDING: "OrderedDict[int, HeaderDeadline]" = OrderedDict()     # this process's, oldest first


class HeaderDeadline(HttpToolsProtocol):
    _header_timer = None

    def _arm(self) -> None:
        if self._header_timer is None:
            self._header_timer = self.loop.call_later(HEADER_SECONDS, self._headers_late)
            _PENDING[id(self)] = self
            while len(_PENDING) > MAX_PENDING:
                _, oldest = _PENDING.popitem(last=False)
                oldest._headers_late()

    def _disarm(self) -> None:
        _PENDING.pop(id(self), None)
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_late(self) -> None:
        self._disarm()
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
