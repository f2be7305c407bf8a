"""Wiring: the daemon that builds the agent's parts and the `coldbrew` command line.

May import anything, including coldbrew.fuse; nothing imports app except `__main__`.
"""
