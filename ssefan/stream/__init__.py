"""Where a channel's events come from and how they reach subscribers; never edge.

upstream (the one subscription to the app's SSE endpoint, fed into a channel
through its sink contract), status (the upstream's state and last failure),
channel (the asyncio shell of one route's fan-out: ring, timers, heartbeat,
the write loop, stream accounting), subscriber (a client's transport,
flow-control marks and reset).
"""
