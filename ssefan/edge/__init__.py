"""The client-facing side: the h11 server adapter, CORS, forward-auth, the proxy.

Imports core, config, http and stream; nothing imports it but ops.
"""
