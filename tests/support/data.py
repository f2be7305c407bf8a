"""Deterministic test objects: random bytes from a seed, uploaded to the test S3 server."""

from __future__ import annotations

import random
from typing import Any


def random_bytes(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


def put_random(client: Any, bucket: str, key: str, size: int, seed: int = 0) -> bytes:
    data = random_bytes(size, seed)
    client.put_object(Bucket=bucket, Key=key, Body=data)
    return data
