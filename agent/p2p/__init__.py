"""Sharing chunks between agents: the libtorrent swarm, torrents built from manifests,
peer discovery, publishing manifests, and the chunk source that asks peers.

May import: fetch, cache, origin, core and the shared agent modules.
"""
