"""The verified chunk cache on local disk: the store's on-disk layout and recovery, landing,
space and eviction, and the one integrity check every reader uses.

May import: core and the shared agent modules.
"""
