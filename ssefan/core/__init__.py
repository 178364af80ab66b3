"""The floor everything stands on: no asyncio, no sockets, nothing else of ssefan.

sse (the WHATWG event-stream grammar: parser and encoder), ring (the replay
ring), fanout (the intake: replays, ids, ring appends), cursors (where each
client stands in the ring: placement, catch-up, who is cut off), framing
(HTTP/1.1 chunks), refusal (what a temporary refusal says), paths (the routing
and variant forms of a request path).
"""
