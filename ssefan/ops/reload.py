"""What a config reload changes, decided without touching anything running.

`plan(old, new)` compares two validated configs route by route (a route is
its path). The App then applies the plan in one event-loop step, so no client
ever sees half of a reload:

* added routes get a channel and a subscription;
* removed routes end their streams (clients reconnect and get 404);
* kept routes keep their clients and ring; a changed `upstream` section
  starts a new subscription (resuming from the last id), changed ring bounds
  rebuild the ring with the same events, anything else applies in place.

What a running process cannot change (its listen address, TLS on or off, the
admin address, the number of workers) is reported, and the old value stays
until a restart. The TLS certificate is not among them: the App reads the
files again on every reload (ops.tls).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from ssefan.config import Config, ListenConfig, RouteConfig

__all__ = ["ReloadPlan", "keep_fixed", "keep_listen", "plan"]


@dataclass(slots=True)
class ReloadPlan:
    added: list[RouteConfig] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    # Kept routes, with their new settings.
    kept: list[RouteConfig] = field(default_factory=list)
    # Paths among `kept` whose upstream changed: a new subscription.
    new_upstream: set[str] = field(default_factory=set)
    # Paths among `kept` whose ring bounds changed.
    new_buffer: set[str] = field(default_factory=set)
    # Human-readable lines about settings that need a restart.
    needs_restart: list[str] = field(default_factory=list)

    def summary(self) -> str:
        parts = []
        for label, paths in (
            ("added", [r.path for r in self.added]),
            ("removed", self.removed),
            ("new upstream", sorted(self.new_upstream)),
            ("new buffer", sorted(self.new_buffer)),
            ("kept", [r.path for r in self.kept]),
        ):
            if paths:
                parts.append(f"{label}: {', '.join(paths)}")
        return "; ".join(parts) or "no routes"


def plan(old: Config, new: Config) -> ReloadPlan:
    result = ReloadPlan()
    before = {route.path: route for route in old.routes}
    after = {route.path for route in new.routes}
    result.removed = [path for path in before if path not in after]
    for route in new.routes:
        previous = before.get(route.path)
        if previous is None:
            result.added.append(route)
            continue
        result.kept.append(route)
        if route.upstream != previous.upstream:
            result.new_upstream.add(route.path)
        if _ring_bounds(route) != _ring_bounds(previous):
            result.new_buffer.add(route.path)
    if _address(new.listen) != _address(old.listen):
        result.needs_restart.append(
            f"listen changed from {_show(old.listen)} to {_show(new.listen)}:"
            f" still listening on {_show(old.listen)} until a restart"
        )
    if (new.listen.tls is None) != (old.listen.tls is None):
        # The listening socket was made with or without a context; a changed
        # certificate, key, min_version or alpn is swapped in by the reload.
        was, now = ("TLS", "plain HTTP") if new.listen.tls is None else ("plain HTTP", "TLS")
        result.needs_restart.append(
            f"listen.tls changed from {was} to {now}: still serving {was} until a restart"
        )
    if new.admin != old.admin:
        was = _show(old.admin.listen) if old.admin else "off"
        now = _show(new.admin.listen) if new.admin else "off"
        result.needs_restart.append(
            f"admin.listen changed from {was} to {now}: the admin endpoints stay {was}"
            " until a restart"
        )
    if new.workers != old.workers:
        result.needs_restart.append(
            f"workers changed from {old.workers} to {new.workers}:"
            f" {old.workers} keep running until a restart"
        )
    return result


def _ring_bounds(route: RouteConfig) -> tuple[int, int, float]:
    return route.buffer, route.buffer_bytes, route.buffer_age


def _address(listen: ListenConfig) -> tuple[str, int]:
    return listen.host, listen.port


def _show(listen: ListenConfig) -> str:
    host = f"[{listen.host}]" if ":" in listen.host else listen.host
    return f"{host}:{listen.port}"


def keep_fixed(running: Config, new: Config) -> Config:
    """`new` with the settings that need a restart held at their running values,
    so the next reload compares against what is really in force."""
    listen = running.listen
    if (new.listen.tls is None) == (running.listen.tls is None):
        listen = replace(running.listen, tls=new.listen.tls)  # certificates follow a reload
    return replace(new, listen=listen, admin=running.admin, workers=running.workers)


def keep_listen(running: Config, new: Config) -> Config:
    """`new` with the running listen settings: the new certificate could not
    be loaded, so the previous one (and its settings) stays in force."""
    return replace(new, listen=running.listen)
