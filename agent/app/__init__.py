"""Wiring: the daemon that builds the agent's parts and the `coldbrew` command line.

May import every agent subpackage and coldbrew.fuse (the loader is the runner's, not the
agent's); nothing imports app except `__main__`.
"""
