"""The HTTP kit every HTTP user shares: imports core and config, never edge or ops.

client (the one HTTP/1.1 client: every outgoing connection, to the app, an
auth endpoint, an upstream or a worker's admin socket), pool (client
connections kept alive per origin), flow (write gates, inboxes), forwarding
(hop-by-hop and X-Forwarded-* headers), request_checks (the request line and
Host, before routing), responses (heads, bodies, the event-stream type),
redaction (credentials out of URLs).
"""
