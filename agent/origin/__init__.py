"""The object store: fsspec metadata, the S3 data plane (ranged GETs into buffers), retries
and the translation of backend errors into ours.

May import: core and the shared agent modules.
"""
