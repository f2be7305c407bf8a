"""Tooling for the demo, the tests and the benchmarks: an embedded S3 server on loopback
and `coldbrew demo`. Not used by the agent itself.

May import core, cache, origin, the control client and coldbrew.loader (the demo loads a
model the way a runner does); not the daemon's parts, not app.
"""
