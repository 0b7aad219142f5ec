"""The limits of tidegate's HTTP/2 server side that the `h2` library does not keep itself.

- Concurrent streams: SETTINGS_MAX_CONCURRENT_STREAMS is advertised as MAX_CONCURRENT_STREAMS (nginx's
  default), and a stream over it is refused alone with RST_STREAM REFUSED_STREAM (RFC 9113 5.1.2; the
  client may send it again), where h2 ends the whole connection.
- Control frames: PING, SETTINGS, PRIORITY and empty DATA frames cost work (and, for PING and SETTINGS, an
  answer) without carrying a request. A connection gets CONTROL_FRAME_BURST of them and CONTROL_FRAMES_PER_SECOND
  more each second; past that it is closed with ENHANCE_YOUR_CALM, as nginx and Envoy close floods.
- Unread output: a client that asks for answers (PING, SETTINGS, responses) and reads none of them is closed
  once MAX_UNREAD_BYTES wait in its socket's buffer.

A listener's ClientPolicy `http2` replaces these on its socket (`for_socket`).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Any

import h2.config
import h2.connection
import h2.settings

MAX_CONCURRENT_STREAMS = 128
CONTROL_FRAME_BURST = 1000
CONTROL_FRAMES_PER_SECOND = 100.0
MAX_UNREAD_BYTES = 4 * 1024 * 1024


@dataclass(frozen=True)
class H2Limits:
    max_concurrent_streams: int = MAX_CONCURRENT_STREAMS
    control_frame_burst: int = CONTROL_FRAME_BURST
    control_frames_per_second: float = CONTROL_FRAMES_PER_SECOND
    max_unread_bytes: int = MAX_UNREAD_BYTES


H2_LIMITS = H2Limits()
_FIELDS = tuple(f.name for f in dataclasses.fields(H2Limits))


def for_socket(policies: list[Any]) -> H2Limits:
    """The limits of one listening socket, from the ClientPolicy http2 (ir.HTTP2Limits) of its listeners: where
    they differ, the smallest."""
    changed = {}
    for name in _FIELDS:
        values = [getattr(p, name) for p in policies if getattr(p, name) is not None]
        if values:
            changed[name] = min(values)
    return dataclasses.replace(H2_LIMITS, **changed) if changed else H2_LIMITS


class ServerConnection(h2.connection.H2Connection):
    """h2's connection, with streams over the advertised concurrency refused one by one (see `refused`)."""

    def __init__(self, config: h2.config.H2Configuration, max_concurrent_streams: int = MAX_CONCURRENT_STREAMS):
        super().__init__(config=config)
        self.local_settings = h2.settings.Settings(client=False, initial_values={
            h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: max_concurrent_streams,
            h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: self.DEFAULT_MAX_HEADER_LIST_SIZE})
        self.refused: set[int] = set()  # streams over the limit, to be reset by the caller as they arrive
        self._admitting = False

    @property
    def open_inbound_streams(self) -> int:
        # While a stream over the limit is being admitted (to be refused right after), h2's check sees room.
        return 0 if self._admitting else super().open_inbound_streams

    def _receive_headers_frame(self, frame: Any) -> Any:
        if frame.stream_id not in self.streams and \
                super().open_inbound_streams >= self.local_settings.max_concurrent_streams:
            # Admitted so that its header block still updates the HPACK state, then refused.
            self.refused.add(frame.stream_id)
            self._admitting = True
            try:
                return super()._receive_headers_frame(frame)
            finally:
                self._admitting = False
        return super()._receive_headers_frame(frame)


class ControlFrameBudget:
    """A token bucket for the control frames of one connection."""

    __slots__ = ("burst", "rate", "tokens", "updated")

    def __init__(self, limits: H2Limits = H2_LIMITS) -> None:
        self.burst = float(limits.control_frame_burst)
        self.rate = limits.control_frames_per_second
        self.tokens = self.burst
        self.updated = time.monotonic()

    def spend(self, frames: int) -> bool:
        """Count `frames` control frames; False once the connection is over its budget."""
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        self.tokens -= frames
        return self.tokens >= 0
