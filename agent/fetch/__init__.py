"""Getting chunks: the single-flight fetcher over its ordered chunk sources, the fetch slots,
prewarm jobs and the prewarm list.

May import: cache, origin, core and the shared agent modules.
"""
