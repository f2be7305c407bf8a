"""The pure chunk model: digests, file identity, chunk layout, manifests, the journal's
line format and the eviction policy. No I/O.

May import: the shared agent modules (errors, units, config, metrics, logs).
"""
