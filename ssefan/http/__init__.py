"""The HTTP kit every HTTP user shares: imports core and config, never edge or ops.

flow (write gates, inboxes), forwarding (hop-by-hop and X-Forwarded-*
headers), pool (the pooled h11 client connections), request_checks (the
request line and Host, before routing), redaction (credentials out of URLs).
"""
