"""A blocking HTTP/2 client over real TLS, built on `h2` (client side), for tests.

httpx hides what the HTTP/2 tests must see (GOAWAY codes, RST_STREAM, windows,
frames nobody well-behaved sends), so this one keeps every stream's headers,
body and end, and the connection's GOAWAY. By default it acknowledges every
DATA frame so windows reopen, as a browser does; `auto_ack=False` makes a
client that stops granting window (the slow reader), `stalled` one stream
that does while its neighbours don't. `send_raw` writes bytes
as they are, for frames h2 won't produce (floods, bombs).

Every read is bounded by DEFAULT_TIMEOUT; `wait` polls a condition while
pumping the socket, never a fixed sleep.
"""

from __future__ import annotations

import socket
import ssl
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
from hyperframe.frame import DataFrame, Frame, HeadersFrame, RstStreamFrame
from raw_http import OPEN_SOCKETS
from sse_clients import ReceivedEvent, StreamDecoder
from waits import DEFAULT_TIMEOUT


@dataclass
class H2Response:
    """What arrived on one stream."""

    headers: dict[bytes, bytes] = field(default_factory=dict)
    body: bytearray = field(default_factory=bytearray)
    decoder: StreamDecoder = field(default_factory=lambda: StreamDecoder(chunked=False))
    ended: bool = False  # END_STREAM from the server
    reset: int | None = None  # the RST_STREAM error code, if the server reset it

    @property
    def status(self) -> int:
        return int(self.headers[b":status"])

    @property
    def events(self) -> list[ReceivedEvent]:
        return self.decoder.events

    @property
    def done(self) -> bool:
        return self.ended or self.reset is not None


class H2Client:
    """One TLS connection speaking HTTP/2 to 127.0.0.1:`port`."""

    def __init__(
        self,
        port: int,
        context: ssl.SSLContext,
        *,
        auto_ack: bool = True,
        window: int | None = None,
        connection_window: int | None = None,
        authority: str = "localhost",
    ) -> None:
        context.set_alpn_protocols(["h2"])
        raw = socket.create_connection(("127.0.0.1", port), timeout=DEFAULT_TIMEOUT)
        try:
            self.sock = context.wrap_socket(raw, server_hostname="localhost")
        except BaseException:
            raw.close()
            raise
        OPEN_SOCKETS.add(self.sock)
        assert self.sock.selected_alpn_protocol() == "h2", self.sock.selected_alpn_protocol()
        self.authority = authority.encode()
        self.auto_ack = auto_ack
        config = h2.config.H2Configuration(client_side=True, header_encoding=None)
        self.conn = h2.connection.H2Connection(config=config)
        self.conn.initiate_connection()
        if window is not None:  # every stream's, and the connection's unless given
            self.conn.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: window})
            connection_window = connection_window or window
        if connection_window is not None:
            grow = connection_window - self.conn.inbound_flow_control_window
            if grow > 0:
                self.conn.increment_flow_control_window(grow)
        # Streams whose window is never given back (their DATA still reopens
        # the connection's): a stream stuck at the client, its neighbours not.
        self.stalled: set[int] = set()
        self.responses: dict[int, H2Response] = {}
        self.goaway: h2.events.ConnectionTerminated | None = None
        self.remote_settings: dict[int, int] = {}
        self.closed = False  # the server closed the socket
        self._send_failed = False
        self._inbox = bytearray()
        self.flush()

    # -- sending -------------------------------------------------------------------

    def flush(self) -> None:
        data = self.conn.data_to_send()
        if data and not self.closed and not self._send_failed:
            try:
                self.sock.sendall(data)
            except OSError:  # the server closed first; what it sent may be still unread
                self._send_failed = True

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def request(
        self,
        path: str,
        headers: Iterable[tuple[str, str]] = (),
        *,
        method: str = "GET",
        body: bytes | None = None,
        body_follows: bool = False,
    ) -> int:
        """Open a stream; the body, if any, is sent whole (window permitting).

        `body_follows`: no body now, the caller sends it with `send_body`.
        """
        stream_id = self.conn.get_next_available_stream_id()
        head = [
            (b":method", method.encode()),
            (b":scheme", b"https"),
            (b":authority", self.authority),
            (b":path", path.encode()),
            *((name.lower().encode(), value.encode()) for name, value in headers),
        ]
        self.responses[stream_id] = H2Response()
        self.conn.send_headers(stream_id, head, end_stream=body is None and not body_follows)
        self.flush()
        if body is not None:
            self.send_body(stream_id, body, end=True)
        return stream_id

    def send_body(self, stream_id: int, body: bytes, *, end: bool) -> None:
        """Send `body` in frames as windows allow, pumping for WINDOW_UPDATEs."""
        view = memoryview(body)
        while view:
            window = min(
                self.conn.local_flow_control_window(stream_id), self.conn.max_outbound_frame_size
            )
            if window <= 0:
                self.pump()
                continue
            self.conn.send_data(stream_id, bytes(view[:window]))
            view = view[window:]
            self.flush()
        if end:
            self.conn.end_stream(stream_id)
            self.flush()

    def reset(self, stream_id: int) -> None:
        self.conn.reset_stream(stream_id)
        self.flush()

    # -- receiving -----------------------------------------------------------------

    def pump(self, timeout: float = DEFAULT_TIMEOUT) -> bool:
        """Read once and handle what came; False once the server has closed."""
        if self.closed:
            return False
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(65536)
        except (ConnectionResetError, ssl.SSLError):
            data = b""
        if not data:
            self.closed = True
            return False
        self._inbox += data
        for frame in self._whole_frames():
            if self.goaway is None:
                try:
                    events = self.conn.receive_data(frame)
                except h2.exceptions.ProtocolError:
                    events = []
                for event in events:
                    self._handle(event)
            else:
                self._after_goaway(frame)
        self.flush()
        return True

    def _whole_frames(self) -> list[bytes]:
        """Split what arrived into whole frames (9-byte header + its length)."""
        frames = []
        inbox = self._inbox
        while len(inbox) >= 9:
            size = 9 + int.from_bytes(inbox[:3], "big")
            if len(inbox) < size:
                break
            frames.append(bytes(inbox[:size]))
            del inbox[:size]
        return frames

    def _after_goaway(self, raw: bytes) -> None:
        """h2 (4.x) stops at a GOAWAY it receives, though RFC 9113 §6.8 lets the
        streams it names finish: their DATA and ends are read here by hand."""
        frame, length = Frame.parse_frame_header(memoryview(raw[:9]))
        frame.parse_body(memoryview(raw[9 : 9 + length]))
        response = self.responses.get(frame.stream_id)
        if response is None:
            return
        if isinstance(frame, DataFrame):
            response.body += frame.data
            response.decoder.feed(frame.data)
            if "END_STREAM" in frame.flags:
                response.ended = True
        elif isinstance(frame, HeadersFrame) and "END_STREAM" in frame.flags:
            response.ended = True
        elif isinstance(frame, RstStreamFrame):
            response.reset = frame.error_code

    def _handle(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.ResponseReceived | h2.events.InformationalResponseReceived):
            if isinstance(event, h2.events.ResponseReceived):
                response = self.responses[event.stream_id]
                response.headers = {bytes(k): bytes(v) for k, v in event.headers or []}
        elif isinstance(event, h2.events.DataReceived):
            response = self.responses[event.stream_id]
            data = event.data or b""
            response.body += data
            response.decoder.feed(data)
            if event.stream_id in self.stalled and event.flow_controlled_length:
                self.conn.increment_flow_control_window(event.flow_controlled_length)
            elif self.auto_ack and event.flow_controlled_length:
                self.conn.acknowledge_received_data(
                    event.flow_controlled_length,
                    event.stream_id,
                )
        elif isinstance(event, h2.events.StreamEnded):
            self.responses[event.stream_id].ended = True
        elif isinstance(event, h2.events.StreamReset):
            if event.stream_id in self.responses:
                self.responses[event.stream_id].reset = int(event.error_code or 0)
        elif isinstance(event, h2.events.ConnectionTerminated):
            self.goaway = event
        elif isinstance(event, h2.events.RemoteSettingsChanged):
            for code, setting in event.changed_settings.items():
                self.remote_settings[int(code)] = setting.new_value

    def wait(
        self, condition: Callable[[], bool], timeout: float = DEFAULT_TIMEOUT, what: str = ""
    ) -> None:
        """Pump until `condition` holds; fail after `timeout` or if the server closes first."""
        deadline = time.monotonic() + timeout
        while not condition():
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"timed out after {timeout}s waiting for {what or condition}")
            if not self.pump(left) and not condition():
                raise AssertionError(f"the server closed while waiting for {what or condition}")

    def wait_closed(self, timeout: float = DEFAULT_TIMEOUT) -> None:
        """Read until the server closes the socket (a GOAWAY's end)."""
        deadline = time.monotonic() + timeout
        while self.pump(max(0.01, deadline - time.monotonic())):
            if time.monotonic() > deadline:
                raise AssertionError(f"the server kept the connection open past {timeout}s")

    def get(self, path: str, headers: Iterable[tuple[str, str]] = ()) -> H2Response:
        """A whole request/response exchange."""
        stream_id = self.request(path, headers)
        response = self.responses[stream_id]
        self.wait(lambda: response.done, what=f"the response to {path}")
        return response

    def close(self) -> None:
        if not self.closed:
            try:
                self.conn.close_connection()
                self.flush()
            except (OSError, h2.exceptions.ProtocolError):
                pass
        self.sock.close()
