"""Tooling for the demo, the tests and the benchmarks: an embedded S3 server on loopback
and `coldbrew demo`. Not used by the agent itself.

May import anything but app.
"""
