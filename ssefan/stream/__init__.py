"""Where a channel's events come from and how they reach subscribers; never edge.

upstream (the one subscription to the app's SSE endpoint, fed into a channel
through its sink contract), status (the upstream's state and last failure),
channel (ring, subscribers, heartbeat, policy).
"""
