"""The floor everything stands on: no asyncio, no sockets, nothing else of ssefan.

sse (the WHATWG event-stream grammar: parser and encoder), ring (the replay
ring), refusal (what a temporary refusal says), paths (the routing and variant
forms of a request path).
"""
