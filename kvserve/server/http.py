"""uvicorn's h11 protocol with a request-header deadline and a bounded kernel send buffer.

uvicorn bounds idle keep-alive connections but not a client that opens a connection and sends its headers a byte at
a time (slowloris), which would hold a connection slot (--max-connections) forever: each request's headers must be
complete within `header_timeout` seconds of the connection opening or of the previous response ending.

A client that stops reading a stream is cut off once a chunk waits longer than --stream-write-timeout (session.py),
but only after the socket's buffers are full; Linux grows a TCP send buffer up to 4 MiB, so a stalled client could
pin that much kernel memory and take minutes to be noticed. A token stream needs a few KB/s, so the send buffer is
capped at SEND_BUFFER_BYTES."""

from __future__ import annotations

import asyncio
import socket

from uvicorn.protocols.http.h11_impl import H11Protocol


SEND_BUFFER_BYTES = 256 * 1024


class HeaderDeadlineH11Protocol(H11Protocol):
    header_timeout: float = 10.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER_BYTES)
        self._header_timer: asyncio.TimerHandle | None = None
        self._arm()

    def _arm(self) -> None:
        self._disarm()
        self._header_timer = self.loop.call_later(self.header_timeout, self._headers_late, self.cycle)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_late(self, cycle_when_armed) -> None:
        if self.cycle is cycle_when_armed and not self.transport.is_closing():
            self.logger.info("closing a connection whose request headers did not arrive within %.0fs",
                             self.header_timeout)
            self.transport.close()

    def handle_events(self) -> None:
        before = self.cycle
        super().handle_events()
        if self.cycle is not before:  # a request's headers are complete
            self._disarm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)


def protocol_with_header_timeout(header_timeout: float) -> type[H11Protocol]:
    return type("HeaderDeadlineH11Protocol", (HeaderDeadlineH11Protocol,), {"header_timeout": header_timeout})
