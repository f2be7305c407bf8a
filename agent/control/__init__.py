"""The control API on the unix socket: the wire (HTTP/1.1 over AF_UNIX), the typed protocol,
the client runners and the CLI use, and the server the agent runs.

The client side (client, unixhttp, protocol) imports only core, the shared agent modules
and the one integrity check (cache.verify), so a runner pod loads it cheaply; the server
(server, leases) may import fetch, cache, origin and core.
"""
