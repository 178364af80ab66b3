"""Pass-through: every request that is not a stream route goes to the app.

One `Exchange` per request, over a pooled keep-alive connection (pool.py):

* A request without a body (most GETs) is sent whole. If a reused connection
  turns out to have been closed by the app before it answered, an idempotent
  request is retried once on a new connection (RFC 9112 §9.3.1).
* A request with a body streams it to the app while the response streams
  back: the app may answer (and even finish) before it has read everything.
* Nothing is buffered whole in either direction: each read from one side
  waits until the other side has taken the previous bytes (flow.py), so
  uploads, large downloads and endless streams cost a window of memory.
* An `Upgrade` request (WebSocket) the app answers with 101 becomes a byte
  tunnel until either side closes.
* The target and host sent on are the ones the server routed by
  (request_checks.CheckedRequest): the app never reads a request other than
  ssefan did. During a drain a response carries `Connection: close`, so no
  browser reuses the connection into a process that is leaving.

Failures get a short plain-text answer that names the request id: the app
unreachable 502, the app too slow 504, a body over the limit 413. Once the
response head has gone out there is nothing left to say, and the client
connection is cut so it can tell the body is incomplete.

Past 400 lines, knowingly: what is left is one exchange's state machine (the
request with or without a body, the retry on a stale connection, the response
relay, the hand-off to a tunnel), whose steps all read and move the same state
(the origin connection, the first-byte timer, what the client was sent, the
request id the errors name). The contract with the adapter is downstream.py,
the byte tunnel tunnel.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable
from typing import TypeVar

import h11

from ssefan.config import Config, ProxyConfig
from ssefan.edge.downstream import ClientGone, Downstream, ProxyError, ToClient
from ssefan.edge.tunnel import tunnel
from ssefan.http.client import Origin, OriginClosed, OriginConnection, OriginProtocolError
from ssefan.http.forwarding import (
    Header,
    TargetRedactor,
    TrustedProxies,
    connection_tokens,
    describe_exception,
    describe_h11_error,
    forwarded_headers,
    header_values,
    new_request_id,
    request_id_from,
    strip_hop_by_hop,
)
from ssefan.http.pool import ConnectionPool
from ssefan.http.request_checks import CheckedRequest
from ssefan.http.responses import is_event_stream, raw_response

__all__ = ["Downstream", "Proxy", "ProxyStats"]

log = logging.getLogger("ssefan.proxy")

# RFC 9110 §9.2.2: methods whose repetition has the same effect as one request.
# Only these are retried after a stale keep-alive connection, and only without
# a body (a body may have been partly consumed; RFC 9112 §9.3.1).
IDEMPOTENT_METHODS = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})

_T = TypeVar("_T")


class ProxyStats:
    """Plain counters, bumped where the work happens and rendered on scrape."""

    __slots__ = ("clients_gone", "failures", "requests", "retries", "tunnels")

    def __init__(self) -> None:
        self.requests = 0
        self.retries = 0  # stale keep-alive connections retried
        self.tunnels = 0
        self.clients_gone = 0
        self.failures: dict[int, int] = {}  # by status answered


class Proxy:
    """Forwards everything that is not a stream route to `config.app`."""

    def __init__(self, config: Config) -> None:
        if config.app is None:
            raise ValueError("pass-through needs config.app")
        self.settings: ProxyConfig = config.proxy
        self.origin = Origin.from_url(config.app)
        self.pool = ConnectionPool(
            self.origin,
            size=config.proxy.pool_size,
            idle_timeout=config.proxy.pool_idle_timeout,
            connect_timeout=config.proxy.connect_timeout,
        )
        self.trusted = TrustedProxies(config.trusted_proxies)
        token_params = [
            route.auth.token_param
            for route in config.routes
            if route.auth is not None and route.auth.token_param
        ]
        self.redact = TargetRedactor(token_params)
        self.stats = ProxyStats()

    async def forward(
        self, client: Downstream, request: h11.Request, checked: CheckedRequest
    ) -> None:
        """Run one request/response exchange (or tunnel) with the app.

        `checked` is the server's reading of the request (request_checks): the
        target and host forwarded are the ones it routed by.
        """
        await Exchange(self, client, request, checked).run()

    def close(self) -> None:
        self.pool.close()


class Exchange:
    """One request forwarded to the app and its response forwarded back."""

    def __init__(
        self, proxy: Proxy, client: Downstream, request: h11.Request, checked: CheckedRequest
    ) -> None:
        self.proxy = proxy
        self.settings = proxy.settings
        self.client = client
        self.request = request
        self.checked = checked
        self.method = bytes(request.method)
        self.raw_headers: list[Header] = [
            (bytes(n), bytes(v)) for n, v in request.headers.raw_items()
        ]
        # The client's own id is kept if it is a sane token, so logs line up
        # end to end; otherwise ours replaces it (it is also what we log).
        self.client_request_id = request_id_from(self.raw_headers)
        self.request_id = self.client_request_id or new_request_id()
        self.origin: OriginConnection | None = None
        self._head_deadline: asyncio.Timeout | None = None
        self._request_sent = False
        self._head_sent = False  # the final response head (or a 101) went to the client

    # -- the whole exchange ---------------------------------------------------------

    async def run(self) -> None:
        self.proxy.stats.requests += 1
        try:
            await self._run()
        except ProxyError as err:
            self._fail(err)
        except ClientGone as gone:
            self.proxy.stats.clients_gone += 1
            log.info("request=%s %s: client gone (%s)", self.request_id, self._what(), gone)
            self.client.abort()
        finally:
            if self.origin is not None:
                # Back to the pool only if both sides finished cleanly (the pool checks).
                self.proxy.pool.release(self.origin)
                self.origin = None

    async def _run(self) -> None:
        # Origin-form (or `*`), as routing read it: an absolute-form target
        # goes on as its path and query, its authority as the Host (RFC 9112
        # §3.2.2); anything else (CONNECT among it) was refused at the door.
        target = self.checked.target.forward
        chunked = _is_chunked(self.raw_headers)
        length = None if chunked else _content_length(self.raw_headers)
        limit = self.settings.max_body_bytes
        if length is not None and length > limit:
            # RFC 9110 §15.5.14: refuse up front; the body is never read, so the
            # connection can't be reused.
            raise ProxyError(413, f"request body of {length} bytes is over the {limit}-byte limit")
        upgrade = self._upgrade_token()
        head = self._app_request(target, chunked=chunked, upgrade=upgrade)
        if chunked or (length or 0) > 0:
            await self._exchange_with_body(head)
        else:
            await self._exchange_without_body(head)

    def _fail(self, err: ProxyError) -> None:
        stats = self.proxy.stats
        stats.failures[err.status] = stats.failures.get(err.status, 0) + 1
        log.warning(
            "request=%s %s -> %d: %s", self.request_id, self._what(), err.status, err.reason
        )
        client, conn = self.client, self.client.conn
        body = f"{err.status} {err.reason} (request {self.request_id})\n"
        request_id = [(b"x-request-id", self.request_id.encode("ascii"))]
        if conn.our_state is h11.SEND_RESPONSE:
            client.respond(
                err.status,
                body,
                request_id,
                # An unread or half-read body leaves the connection out of sync;
                # and no keep-alive into a process that is leaving.
                close=conn.their_state is not h11.DONE
                or err.status in (408, 413)
                or not client.keep_alive,
            )
        elif conn.our_state is h11.ERROR and not self._head_sent:
            # h11 refused the head we gave it, and wrote none of it: the answer
            # goes out without h11, and the connection can't carry another.
            with contextlib.suppress(ConnectionError):
                client.write_raw(raw_response(err.status, body, request_id))
            client.close()
        else:
            client.abort()  # the head is out: cutting the body is all that's left

    def _what(self) -> str:
        target = self.checked.target.forward.decode("ascii", "replace")
        return f"{self.method.decode('ascii', 'replace')} {self.proxy.redact(target)}"

    # -- without a body: send whole, retry once on a stale connection -----------------

    async def _exchange_without_body(self, head: h11.Request) -> None:
        end = await self._from_client(self.client.receive())  # h11 has it already
        if not isinstance(end, h11.EndOfMessage):
            raise ProxyError(400, "malformed request")
        retryable = self.method in IDEMPOTENT_METHODS
        first_byte = self.settings.first_byte_timeout
        fresh = False
        while True:
            origin = await self._connect(fresh=fresh)
            try:
                origin.write(head)
                origin.write(h11.EndOfMessage())
                async with asyncio.timeout(first_byte):
                    response = await self._response_head(origin)
            except TimeoutError:
                raise ProxyError(504, f"the app did not answer within {first_byte:g}s") from None
            except OriginClosed as closed:
                if retryable and closed.early and origin.reused:
                    # The app closed this idle connection just as we reused it.
                    self.proxy.stats.retries += 1
                    log.debug("request=%s: stale keep-alive connection, retrying", self.request_id)
                    self._drop_origin()
                    retryable, fresh = False, True
                    continue
                raise ProxyError(502, f"the app {closed}") from None
            break
        if isinstance(response, h11.InformationalResponse):
            await self._tunnel(origin, response)
        else:
            await self._relay_response(origin, response)

    # -- with a body: upload and download at once -------------------------------------

    async def _exchange_with_body(self, head: h11.Request) -> None:
        origin = await self._connect()
        try:
            origin.write(head)
        except OriginClosed as closed:
            raise ProxyError(502, f"the app {closed}") from None
        try:
            async with asyncio.TaskGroup() as group:
                upload = group.create_task(self._upload(origin))
                # No first-byte deadline while the body is still going up: a long
                # upload is not a slow app. _upload arms it when it is done.
                async with asyncio.timeout(None) as deadline:
                    self._head_deadline = deadline
                    if self._request_sent:
                        self._arm_first_byte()
                    response = await self._app_response_head(origin)
                self._head_deadline = None
                if isinstance(response, h11.InformationalResponse):
                    raise ProxyError(502, "the app switched protocols on a request with a body")
                await self._relay_response(origin, response)
                # The app answered in full before reading everything: the rest of
                # the body is not needed (and the client connection closes).
                upload.cancel()
        except BaseExceptionGroup as group:
            raise _most_telling(group) from None

    async def _upload(self, origin: OriginConnection) -> None:
        limit, idle = self.settings.max_body_bytes, self.settings.idle_timeout
        received = 0
        while True:
            try:
                async with asyncio.timeout(idle):
                    event = await self._from_client(self.client.receive())
            except TimeoutError:
                raise ProxyError(408, f"the request body stalled for {idle:g}s") from None
            if isinstance(event, h11.Data):
                received += len(event.data)
                if received > limit:
                    # A chunked upload has no length up front: it is cut when it
                    # crosses the limit (RFC 9110 §15.5.14).
                    raise ProxyError(413, f"request body is over the {limit}-byte limit")
                if not await self._to_app(origin, h11.Data(data=bytes(event.data))):
                    return
            elif isinstance(event, h11.EndOfMessage):
                # Trailers are dropped: RFC 9110 §6.5.1 lets a proxy discard them.
                await self._to_app(origin, h11.EndOfMessage())
                return
            else:
                raise ClientGone("closed the connection mid-body")

    async def _to_app(self, origin: OriginConnection, event: h11.Data | h11.EndOfMessage) -> bool:
        """Send part of the body; False if the app stopped listening (its answer will tell)."""
        idle = self.settings.idle_timeout
        try:
            origin.write(event)
            if isinstance(event, h11.EndOfMessage):
                self._request_sent = True
                self._arm_first_byte()
            if origin.writing_paused:
                async with asyncio.timeout(idle):
                    await origin.drain()
        except TimeoutError:
            raise ProxyError(
                504, f"the app stopped reading the request body for {idle:g}s"
            ) from None
        except OriginClosed:
            # The app may have answered early and closed (e.g. its own 413):
            # the download side relays that answer, or reports the failure.
            self._request_sent = True
            self._arm_first_byte()
            return False
        return True

    def _arm_first_byte(self) -> None:
        if self._head_deadline is not None:
            loop = asyncio.get_running_loop()
            self._head_deadline.reschedule(loop.time() + self.settings.first_byte_timeout)

    async def _app_response_head(
        self, origin: OriginConnection
    ) -> h11.Response | h11.InformationalResponse:
        try:
            return await self._response_head(origin)
        except TimeoutError:
            timeout = self.settings.first_byte_timeout
            raise ProxyError(504, f"the app did not answer within {timeout:g}s") from None
        except OriginClosed as closed:
            raise ProxyError(502, f"the app {closed}") from None

    # -- the response ----------------------------------------------------------------

    async def _response_head(
        self, origin: OriginConnection
    ) -> h11.Response | h11.InformationalResponse:
        """The app's final response head, or its 101; other 1xx are relayed on the way."""
        while True:
            event = await self._from_app(origin.receive())
            if isinstance(event, h11.Response):
                return event
            if not isinstance(event, h11.InformationalResponse):
                raise ProxyError(502, f"the app sent {type(event).__name__} before a response")
            if event.status_code == 101:
                return event
            # RFC 9110 §15.2: 1xx (100 Continue, 103 Early Hints) go on to
            # HTTP/1.1 clients, never to HTTP/1.0 ones.
            if self.client.conn.their_http_version == b"1.1":
                headers = strip_hop_by_hop(event.headers.raw_items())
                await self._to_client(
                    h11.InformationalResponse(
                        status_code=event.status_code, headers=headers, reason=event.reason
                    )
                )

    async def _relay_response(self, origin: OriginConnection, response: h11.Response) -> None:
        headers = _response_headers(response)
        if not self.client.keep_alive:
            # A drain: the client must not reuse this connection into a process
            # that is leaving (a browser would send an EventSource's reconnect
            # on it). h11 closes it after this response.
            headers.append((b"Connection", b"close"))
        try:
            head = h11.Response(
                status_code=response.status_code, headers=headers, reason=response.reason
            )
        except h11.LocalProtocolError as exc:
            raise ProxyError(502, _unrelayable(exc)) from None
        await self._to_client(head)
        idle = self.settings.idle_timeout
        while True:
            try:
                async with asyncio.timeout(idle):
                    event = await self._from_app(origin.receive())
            except TimeoutError:
                raise ProxyError(504, f"the app's response went silent for {idle:g}s") from None
            except OriginClosed as closed:
                raise ProxyError(502, f"the app {closed} mid-response") from None
            if isinstance(event, h11.Data):
                await self._to_client(h11.Data(data=bytes(event.data)))
            elif isinstance(event, h11.EndOfMessage):
                await self._to_client(h11.EndOfMessage())
                return
            else:
                raise ProxyError(502, f"the app sent {type(event).__name__} mid-response")

    # -- upgrade: a byte tunnel after 101 ---------------------------------------------

    async def _tunnel(self, origin: OriginConnection, switch: h11.InformationalResponse) -> None:
        headers = [
            (name, value)
            for name, value in strip_hop_by_hop(switch.headers.raw_items())
            if name.lower() != b"upgrade"
        ]
        # RFC 9110 §7.8: a 101 names the protocol switched to, and the switch is
        # announced hop by hop (Connection: upgrade).
        protocol = header_values(switch.headers.raw_items(), b"upgrade")
        headers += [(b"Connection", b"Upgrade"), *((b"Upgrade", value) for value in protocol)]
        await self._to_client(
            h11.InformationalResponse(status_code=101, headers=headers, reason=switch.reason)
        )
        self.proxy.stats.tunnels += 1
        ended = await tunnel(self.client, origin, self.settings.idle_timeout)
        log.debug("request=%s tunnel ended: %s", self.request_id, ended)

    # -- the request head ---------------------------------------------------------------

    def _upgrade_token(self) -> bool:
        # RFC 9110 §7.8: Upgrade is only meaningful with "Connection: upgrade",
        # and HTTP/1.0 has no protocol switching.
        return (
            self.request.http_version == b"1.1"
            and b"upgrade" in connection_tokens(self.raw_headers)
            and bool(header_values(self.raw_headers, b"upgrade"))
        )

    def _app_request(self, target: bytes, *, chunked: bool, upgrade: bool) -> h11.Request:
        client = self.client
        headers = strip_hop_by_hop(self.raw_headers)
        # The host the request is for, as check_request read it: valid, and an
        # absolute-form target's authority over any Host header (RFC 9112
        # §3.2.2). First, as RFC 9112 §3.2 asks; X-Forwarded-Host names it too.
        headers = [(n, v) for n, v in headers if n.lower() != b"host"]
        if self.checked.host is not None:
            headers.insert(0, (b"Host", self.checked.host))
        if chunked:
            # RFC 9112 §6.3: with both, Transfer-Encoding wins and Content-Length
            # must go (a classic request-smuggling vector).
            headers = [(n, v) for n, v in headers if n.lower() != b"content-length"]
            headers.append((b"Transfer-Encoding", b"chunked"))
        headers = forwarded_headers(
            headers,
            peer_ip=client.peer_ip,
            scheme=client.scheme,
            trusted=client.peer_ip in self.proxy.trusted,
        )
        if self.checked.host is None:
            # HTTP/1.0 without a Host: the app's own (and no X-Forwarded-Host).
            headers.insert(0, (b"Host", self.proxy.origin.host_header.encode("ascii")))
        if self.client_request_id is None:
            headers = [(n, v) for n, v in headers if n.lower() != b"x-request-id"]
            headers.append((b"X-Request-ID", self.request_id.encode("ascii")))
        if upgrade:
            headers.append((b"Connection", b"upgrade"))
            headers += [(b"Upgrade", v) for v in header_values(self.raw_headers, b"upgrade")]
        return h11.Request(method=self.method, target=target, headers=headers)

    # -- the two sides ------------------------------------------------------------------

    async def _connect(self, *, fresh: bool = False) -> OriginConnection:
        timeout = self.settings.connect_timeout
        try:
            self.origin = await self.proxy.pool.acquire(fresh=fresh)
        except TimeoutError:
            raise ProxyError(
                504, f"the app did not accept a connection within {timeout:g}s"
            ) from None
        except OSError as exc:
            raise ProxyError(502, f"the app is unreachable ({describe_exception(exc)})") from None
        return self.origin

    def _drop_origin(self) -> None:
        if self.origin is not None:
            self.origin.abort()
            self.origin = None

    async def _from_app(self, step: Awaitable[_T]) -> _T:
        try:
            return await step
        except OriginProtocolError as exc:
            raise ProxyError(502, f"the app's response was not valid HTTP/1.1 ({exc})") from None

    async def _from_client(self, step: Awaitable[_T]) -> _T:
        try:
            return await step
        except h11.RemoteProtocolError as exc:
            if self.client.conn.our_state is h11.SEND_RESPONSE:
                raise ProxyError(
                    400, f"malformed request body ({describe_h11_error(exc)})"
                ) from None
            raise ClientGone(f"malformed request body ({describe_h11_error(exc)})") from None
        except ConnectionError:
            raise ClientGone("closed the connection") from None

    async def _to_client(self, event: ToClient) -> None:
        client = self.client
        try:
            client.write(event)
            if isinstance(event, h11.Response) or _is_switch(event):
                self._head_sent = True
            if client.writing_paused:
                idle = self.settings.idle_timeout
                try:
                    async with asyncio.timeout(idle):
                        await client.drain()
                except TimeoutError:
                    raise ClientGone(f"stopped reading for {idle:g}s") from None
        except ConnectionError:
            raise ClientGone("closed the connection") from None
        except h11.LocalProtocolError as exc:
            # h11 refused to frame what the app sent for this client (e.g. a
            # body longer than the Content-Length it declared): a 502 if the
            # head is not out yet, else the body is cut (see _fail), and a
            # warning either way, never a traceback.
            raise ProxyError(502, _unrelayable(exc)) from None


def _is_chunked(headers: list[Header]) -> bool:
    return any(
        b"chunked" in value.lower() for value in header_values(headers, b"transfer-encoding")
    )


def _content_length(headers: list[Header]) -> int | None:
    values = header_values(headers, b"content-length")
    return int(values[0]) if values else None  # h11 validated it


def _response_headers(response: h11.Response) -> list[Header]:
    """The app's response headers as they go on to the client."""
    received = response.headers.raw_items()
    headers = strip_hop_by_hop(received)
    if header_values(received, b"transfer-encoding"):
        # RFC 9112 §6.3: Transfer-Encoding overrides Content-Length, and h11
        # read the body by it. The length is not the body's: forwarded, it
        # would mis-frame the body for the client (h11 frames it anew).
        headers = [(n, v) for n, v in headers if n.lower() != b"content-length"]
    content_type = header_values(headers, b"content-type")
    if content_type and is_event_stream(content_type[0]):
        headers = _without_buffering(headers)
    return headers


def _is_switch(event: ToClient) -> bool:
    return isinstance(event, h11.InformationalResponse) and event.status_code == 101


def _unrelayable(exc: h11.LocalProtocolError) -> str:
    return f"the app's response can't be relayed as HTTP/1.1 ({describe_h11_error(exc)})"


def _without_buffering(headers: list[Header]) -> list[Header]:
    """Anti-buffering for a streamed event-stream, as on ssefan's own streams."""
    out = [(n, v) for n, v in headers if n.lower() != b"x-accel-buffering"]
    # nginx (and proxies that copy it) would otherwise buffer the stream.
    out.append((b"X-Accel-Buffering", b"no"))
    if not header_values(out, b"cache-control"):
        out.append((b"Cache-Control", b"no-cache"))
    return out


def _most_telling(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The one failure of an upload/download pair to act on.

    A client-side cause (bad or oversized body, client gone) explains any
    app-side error that followed from it; anything unexpected is a bug and
    surfaces as the group itself.
    """
    errors = group.exceptions
    if any(not isinstance(e, ProxyError | ClientGone) for e in errors):
        return group
    for error in errors:
        if isinstance(error, ProxyError) and error.status in (400, 408, 413):
            return error
    for error in errors:
        if isinstance(error, ClientGone):
            return error
    return errors[0]
