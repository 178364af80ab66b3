"""Prometheus text exposition, rendered from plain counters only when scraped.

The hot path bumps ints on `ChannelStats`, `Upstream`, `Server`, `ProxyStats`
and `AuthStats`; nothing
here runs per event. `collect()` turns them into `Family` values, `render()`
writes the text format (version 0.0.4, what every Prometheus scrapes), and the
JSON form lets a supervisor gather its workers' families and label each with
`worker` (see `merge`).

Past 400 lines, knowingly: what is collected and how it is exposed (text,
JSON for a supervisor, the status page's summary) are one naming contract:
each family's name, kind and labels are written once, here.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from ssefan.core.ring import Ring, RingBudget
from ssefan.stream.channel import Channel, ChannelStats, DisconnectReason
from ssefan.stream.keyed import KeyedChannels
from ssefan.stream.upstream import Upstream, UpstreamCounts, UpstreamState

if TYPE_CHECKING:
    from ssefan.edge.auth import AuthStats
    from ssefan.edge.proxy import ProxyStats

__all__ = [
    "CONTENT_TYPE",
    "Family",
    "ProcessInfo",
    "collect",
    "from_json",
    "merge",
    "render",
    "status",
    "to_json",
]

CONTENT_TYPE = b"text/plain; version=0.0.4; charset=utf-8"

Labels = dict[str, str]


@dataclass(slots=True)
class Family:
    name: str  # as it appears in samples: counters end in _total
    kind: Literal["counter", "gauge"]
    help: str
    samples: list[tuple[Labels, float]] = field(default_factory=list)

    def add(self, labels: Labels, value: float) -> None:
        self.samples.append((labels, value))


@dataclass(slots=True)
class ProcessInfo:
    """Process-wide values that live outside the channels."""

    version: str
    started_at: float  # unix time
    ready: bool
    refused: Mapping[int, int]  # Server.refused: refusals by HTTP status
    connections: int  # open client connections, streams or not
    reloads: Mapping[str, int]  # "ok" / "failed"
    # Pass-through counters (None without `app`) and forward-auth's by route.
    # Both start over when a reload replaces them (a counter reset to
    # Prometheus, which rate() handles).
    proxy: ProxyStats | None = None
    auth: Mapping[str, AuthStats] = field(default_factory=dict)
    # Server.http2: HTTP/2 connections opened, streams reset by ssefan, and
    # GOAWAYs sent by reason (goaway_rapid_reset, goaway_idle, ...).
    http2: Mapping[str, int] = field(default_factory=dict)


def collect(
    channels: Mapping[str, Channel],
    upstreams: Mapping[str, Upstream],
    process: ProcessInfo,
    keyed: Mapping[str, KeyedChannels] | None = None,
    ring_budget: RingBudget | None = None,
) -> list[Family]:
    """Every metric of one process, read from its counters at this moment."""
    f = _Families()
    f.gauge("ssefan_info", "Build information (value 1).").add({"version": process.version}, 1)
    f.gauge("ssefan_start_time_seconds", "Unix time the process started.").add(
        {}, process.started_at
    )
    f.gauge("ssefan_ready", "1 while listening and every eager upstream streams.").add(
        {}, int(process.ready)
    )
    f.gauge("ssefan_connections", "Open client connections (streams and others).").add(
        {}, process.connections
    )
    refused = f.counter("ssefan_refused_total", "Requests refused, by HTTP status.")
    for status, count in sorted(process.refused.items()):
        refused.add({"status": str(status)}, count)
    reloads = f.counter("ssefan_reloads_total", "Config reloads (SIGHUP), by result.")
    for result in ("ok", "failed"):
        reloads.add({"result": result}, process.reloads.get(result, 0))
    for path, channel in channels.items():
        upstream = upstreams.get(path)
        _route(f, path, channel.stats, channel.client_count)
        _rings(f, path, [channel.ring], channel.clock())
        if upstream is not None:
            _upstreams(f, path, [upstream], upstream.counts)
    for path, family in (keyed or {}).items():
        _keyed(f, path, family)
    if ring_budget is not None:
        f.gauge(
            "ssefan_ring_budget_bytes", "Bytes all rings hold together (ring_bytes_total's count)."
        ).add({}, ring_budget.held)
        f.counter(
            "ssefan_ring_budget_evictions_total",
            "Events evicted because ring_bytes_total was reached (the largest rings' oldest).",
        ).add({}, ring_budget.evictions)
    http2 = f.counter(
        "ssefan_http2_events_total",
        "HTTP/2 connection events: connections (opened), resets_sent (streams ssefan"
        " reset), goaway_<reason> (GOAWAYs sent: idle, drain, rapid_reset, ping_flood,"
        " settings_flood, empty_frames, too_many_streams, header_flood, protocol_error...).",
    )
    # connections and resets_sent from 0, so rate() sees them from the start;
    # a GOAWAY reason appears with its first.
    for event, count in sorted({"connections": 0, "resets_sent": 0, **process.http2}.items()):
        http2.add({"event": event}, count)
    if process.proxy is not None:
        _proxy(f, process.proxy)
    for path, stats in process.auth.items():
        _auth(f, path, stats)
    return f.families()


def _proxy(f: _Families, stats: ProxyStats) -> None:
    f.counter("ssefan_proxy_requests_total", "Requests passed through to the app.").add(
        {}, stats.requests
    )
    f.counter(
        "ssefan_proxy_retries_total",
        "Requests sent again on a fresh connection after a stale keep-alive one closed.",
    ).add({}, stats.retries)
    f.counter("ssefan_proxy_tunnels_total", "Upgraded connections tunnelled (WebSocket).").add(
        {}, stats.tunnels
    )
    f.counter(
        "ssefan_proxy_clients_gone_total", "Pass-through exchanges the client left early."
    ).add({}, stats.clients_gone)
    failures = f.counter(
        "ssefan_proxy_failures_total",
        "Pass-through requests ssefan answered itself (502, 504, 413...), by status.",
    )
    for status, count in sorted(stats.failures.items()):
        failures.add({"status": str(status)}, count)


def _auth(f: _Families, path: str, stats: AuthStats) -> None:
    route = {"route": path}
    f.counter("ssefan_auth_requests_total", "Requests sent to the forward-auth endpoint.").add(
        route, stats.asks
    )
    f.counter(
        "ssefan_auth_cache_hits_total", "Stream requests decided from the decision cache."
    ).add(route, stats.cache_hits)
    decisions = f.counter(
        "ssefan_auth_decisions_total",
        "Forward-auth answers: admitted (2xx), denied (401/403), unavailable"
        " (no answer, another status, or too many asks in flight: 503 to clients).",
    )
    decisions.add({**route, "result": "admitted"}, stats.admitted)
    decisions.add({**route, "result": "denied"}, stats.denied)
    decisions.add({**route, "result": "unavailable"}, stats.unavailable)
    f.counter(
        "ssefan_auth_saturated_total",
        "Asks not sent because MAX_CONCURRENT_ASKS were in flight for the whole auth timeout.",
    ).add(route, stats.saturated)
    f.counter("ssefan_auth_revoked_total", "Streams ended because revalidation refused them.").add(
        route, stats.revoked
    )


def _route(f: _Families, path: str, stats: ChannelStats, clients: int) -> None:
    """A route's stream counters: one channel's, or the sums over a template's keys."""
    route = {"route": path}
    f.gauge("ssefan_clients", "Client streams connected now.").add(route, clients)
    f.counter("ssefan_connects_total", "Client streams opened.").add(route, stats.connects)
    disconnects = f.counter(
        "ssefan_disconnects_total",
        "Client streams ended, by reason (client_closed, slow, evicted, drain,"
        " upstream_stopped, revoked, error; limit = refused for max_clients).",
    )
    for reason in DisconnectReason:
        disconnects.add({**route, "reason": reason.value}, stats.disconnects[reason])
    refusals = f.counter(
        "ssefan_stream_refusals_total",
        "Stream requests refused for a temporary reason and told to retry, by reason"
        " (shutting_down, max_clients, auth_unavailable, reconfigured).",
    )
    for refusal, count in stats.refusals.items():
        refusals.add({**route, "reason": refusal.value}, count)
    f.counter("ssefan_events_received_total", "Events taken from the upstream.").add(
        route, stats.events_received
    )
    f.counter("ssefan_events_delivered_total", "Events written to clients (sum).").add(
        route, stats.events_delivered
    )
    f.counter("ssefan_bytes_out_total", "Stream body bytes written to clients.").add(
        route, stats.bytes_out
    )
    replays = f.counter(
        "ssefan_replays_total",
        "Reconnects with Last-Event-ID: hit (resumed exactly), miss (unknown id),"
        " gap (id already evicted).",
    )
    replays.add({**route, "result": "hit"}, stats.replay_hits)
    replays.add({**route, "result": "miss"}, stats.replay_misses)
    replays.add({**route, "result": "gap"}, stats.replay_gaps)
    f.counter("ssefan_duplicates_dropped_total", "Upstream replays already held.").add(
        route, stats.duplicates_dropped
    )
    f.counter(
        "ssefan_ids_reused_total",
        "Upstream events whose id an earlier event had (sent with an id ssefan assigns).",
    ).add(route, stats.ids_reused)
    f.counter("ssefan_overflows_total", "Upstream events dropped for their size.").add(
        route, stats.overflows
    )
    f.counter("ssefan_heartbeats_total", "Heartbeats sent (one per channel tick).").add(
        route, stats.heartbeats
    )


def _rings(f: _Families, path: str, rings: list[Ring], now: float) -> None:
    """Ring gauges: held events and bytes summed over `rings`; ages of the oldest."""
    route = {"route": path}
    held = sum(len(ring) for ring in rings)
    f.gauge("ssefan_ring_events", "Events held for replay.").add(route, held)
    f.gauge("ssefan_ring_bytes", "Encoded bytes held for replay.").add(
        route, sum(ring.held_bytes for ring in rings)
    )
    filled = [ring for ring in rings if len(ring)]
    oldest = max((now - ring.time_at(ring.first_seq) for ring in filled), default=0.0)
    f.gauge("ssefan_ring_oldest_age_seconds", "Age of the oldest event held.").add(route, oldest)
    if filled:
        # The newest ring entry is the last thing the upstream sent (the ring
        # always keeps it), unlike channel.last_event_at which heartbeats move.
        f.gauge(
            "ssefan_upstream_last_event_age_seconds", "Seconds since the upstream's last event."
        ).add(route, min(now - ring.time_at(ring.next_seq - 1) for ring in filled))


def _upstreams(f: _Families, path: str, upstreams: list[Upstream], counts: UpstreamCounts) -> None:
    """Upstream gauges and counters; for a template, upstreams per state."""
    route = {"route": path}
    states = f.gauge(
        "ssefan_upstream_state",
        "The upstream's state (1 for the current one; a template route: its keys' upstreams"
        " in each state).",
    )
    for state in UpstreamState:
        states.add({**route, "state": state.value}, sum(u.state is state for u in upstreams))
    f.counter("ssefan_upstream_connects_total", "Upstream responses that began a stream.").add(
        route, counts.connects
    )
    f.counter(
        "ssefan_upstream_failures_total", "Upstream connections that failed (then retried)."
    ).add(route, counts.failures)


def _keyed(f: _Families, path: str, family: KeyedChannels) -> None:
    """A template route: sums over its keys, never a label per key (cardinality)."""
    route = {"route": path}
    channels = list(family)
    _route(f, path, family.stats, family.client_count)
    _rings(f, path, [channel.ring for channel in channels], family.clock())
    _upstreams(
        f,
        path,
        [c.source for c in channels if isinstance(c.source, Upstream)],
        family.upstream_counts,
    )
    f.gauge("ssefan_channels", "Live keys (channels) of a template route.").add(
        route, len(channels)
    )
    f.counter("ssefan_channels_opened_total", "Channels made for a template route's keys.").add(
        route, family.opened
    )
    closed = f.counter(
        "ssefan_channels_closed_total",
        "Template channels freed, by reason (linger, upstream_gone, reload, limit).",
    )
    for reason, count in family.closed.items():
        closed.add({**route, "reason": reason.value}, count)
    # For the status page only (a name with "_" first is never rendered):
    # the busiest keys, which must not become series.
    busiest = f.gauge("_busiest_keys", "")
    for key, clients in family.busiest(10):
        busiest.add({**route, "key": key}, clients)


class _Families:
    """Families by name, in first-use order (the text format groups samples)."""

    def __init__(self) -> None:
        self._by_name: dict[str, Family] = {}

    def counter(self, name: str, help: str) -> Family:
        return self.family(name, "counter", help)

    def gauge(self, name: str, help: str) -> Family:
        return self.family(name, "gauge", help)

    def family(self, name: str, kind: Literal["counter", "gauge"], help: str) -> Family:
        family = self._by_name.get(name)
        if family is None:
            family = self._by_name[name] = Family(name, kind, help)
        return family

    def families(self) -> list[Family]:
        return list(self._by_name.values())


def merge(
    per_worker: Iterable[tuple[str, list[Family]]], extra: Iterable[Family] = ()
) -> list[Family]:
    """One family list from many workers', each sample labelled worker="<n>".

    Kept per worker rather than summed: a restarted worker's counters start at
    0 again, which Prometheus' rate() handles per series; a sum would drop and
    read as a reset of every worker at once. `sum without (worker)` in a query
    gives the total.
    """
    merged = _Families()
    for worker, families in per_worker:
        for family in families:
            target = merged.family(family.name, family.kind, family.help)
            for labels, value in family.samples:
                target.add({**labels, "worker": worker}, value)
    for family in extra:
        target = merged.family(family.name, family.kind, family.help)
        target.samples.extend(family.samples)
    return merged.families()


def render(families: Iterable[Family]) -> bytes:
    """The Prometheus text format (0.0.4)."""
    lines: list[str] = []
    for family in families:
        if family.name.startswith("_"):
            continue  # status-page data, not a metric (see _keyed)
        lines.append(f"# HELP {family.name} {_escape_help(family.help)}")
        lines.append(f"# TYPE {family.name} {family.kind}")
        for labels, value in family.samples:
            lines.append(f"{family.name}{_labels(labels)} {_number(value)}")
    return ("\n".join(lines) + "\n").encode("utf-8")


def _labels(labels: Labels) -> str:
    if not labels:
        return ""
    inner = ",".join(f'{k}="{_escape_label(v)}"' for k, v in labels.items())
    return "{" + inner + "}"


def _escape_label(value: str) -> str:
    return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


def _escape_help(text: str) -> str:
    return text.replace("\\", r"\\").replace("\n", r"\n")


def _number(value: float) -> str:
    if isinstance(value, int) or (math.isfinite(value) and value.is_integer()):
        return str(int(value))
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(value)


def to_json(families: Iterable[Family]) -> bytes:
    data = [
        {"name": f.name, "kind": f.kind, "help": f.help, "samples": f.samples} for f in families
    ]
    return json.dumps(data, separators=(",", ":")).encode("utf-8")


def from_json(data: bytes) -> list[Family]:
    families: list[Family] = []
    for item in json.loads(data):
        kind: Literal["counter", "gauge"] = "counter" if item["kind"] == "counter" else "gauge"
        samples = [(dict(labels), float(value)) for labels, value in item["samples"]]
        families.append(Family(str(item["name"]), kind, str(item["help"]), samples))
    return families


def status(families: Iterable[Family]) -> dict[str, object]:
    """What the live status page shows: per route clients, events received and
    upstream states, summed (or listed) over workers; for a template route its
    live keys and its ten busiest keys."""
    clients: dict[str, int] = {}
    events: dict[str, int] = {}
    states: dict[str, list[str]] = {}
    channels: dict[str, int] = {}
    busiest: dict[str, dict[str, int]] = {}
    connections = 0
    for family in families:
        for labels, value in family.samples:
            route = labels.get("route", "")
            if family.name == "ssefan_channels":
                channels[route] = channels.get(route, 0) + int(value)
            elif family.name == "_busiest_keys":
                keys = busiest.setdefault(route, {})
                keys[labels["key"]] = keys.get(labels["key"], 0) + int(value)
            elif family.name == "ssefan_clients":
                clients[route] = clients.get(route, 0) + int(value)
            elif family.name == "ssefan_events_received_total":
                events[route] = events.get(route, 0) + int(value)
            elif family.name == "ssefan_upstream_state" and value:
                states.setdefault(route, []).append(labels["state"])
            elif family.name == "ssefan_connections":
                connections += int(value)
    return {
        "time": time.time(),
        "clients": sum(clients.values()),
        "connections": connections,
        "routes": [
            {
                "route": route,
                "clients": count,
                "events": events.get(route, 0),
                "upstream": sorted(states.get(route, [])),
                **(
                    {
                        "channels": channels[route],
                        "busiest": [
                            {"key": key, "clients": n}
                            for key, n in sorted(
                                busiest.get(route, {}).items(), key=lambda item: -item[1]
                            )[:10]
                        ],
                    }
                    if route in channels
                    else {}
                ),
            }
            for route, count in clients.items()
        ],
    }
