"""What the origin itself vouches for about an object's bytes, and the check against it.

A manifest from another agent names the piece hashes every chunk is verified against, so a
member that lies in its manifest would have its own bytes "verified". What it cannot forge
is what the object store says about the object:

* the ETag of a single-part upload (without SSE-KMS) is the MD5 of the whole object;
* the ETag of a multipart upload is ``md5(md5(part 1) ‖ … ‖ md5(part N))-N``, given the
  part sizes (``GetObjectAttributes``);
* ``ChecksumSHA256`` of a full-object checksum (an upload that sent one), base64.

CRC32/CRC64 checksums are not used: anyone can make altered bytes with the same CRC.
MD5 stands here because the forger must match bytes it did not choose (a second
preimage, out of reach), not make two colliding files of its own.

:class:`Vouch` is that expectation; :class:`FileCheck` hashes the file's bytes in order
and says whether they match. Pure: the bytes are handed in by the caller.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import itertools
import re
from collections.abc import Sequence
from dataclasses import dataclass

_MD5_HEX = re.compile(r"^[0-9a-f]{32}$")
_MULTIPART = re.compile(r"^([0-9a-f]{32})-([0-9]+)$")


@dataclass(frozen=True)
class Vouch:
    """The origin's word on an object's bytes: ``algorithm`` over ``parts`` (byte ranges).

    One part: the hash of the whole object must be ``expected``. Several: each part is
    hashed, and the hash of their digests concatenated must be ``expected`` (S3 multipart).
    """

    algorithm: str  # "md5" or "sha256" (hashlib names)
    parts: tuple[tuple[int, int], ...]
    expected: str  # hex
    source: str  # what said so, for messages: "ETag", "multipart ETag", "ChecksumSHA256"

    def __post_init__(self) -> None:
        pos = 0
        for start, end in self.parts:
            if start != pos or end < start:
                raise ValueError(f"parts must tile the object in order: {self.parts}")
            pos = end

    @property
    def size(self) -> int:
        return self.parts[-1][1] if self.parts else 0


def etag_text(etag: str) -> str:
    """An ETag as S3 spells it in a digest: unquoted, lower case."""
    return etag.strip().strip('"').lower()


def from_s3_head(size: int, etag: str, checksum_sha256: str | None = None,
                 checksum_type: str | None = None,
                 part_sizes: Sequence[int] | None = None) -> Vouch | None:
    """The strongest check an S3 HEAD (and, for multipart, the part sizes) allows; None if none.

    ``part_sizes`` is needed only for a multipart ETag; sizes that do not add up to the
    object, or a count that differs from the ETag's, give no check (never a false alarm).
    """
    if checksum_sha256 and "-" not in checksum_sha256 and checksum_type != "COMPOSITE":
        try:
            raw = base64.b64decode(checksum_sha256, validate=True)
        except (binascii.Error, ValueError):
            raw = b""
        if len(raw) == 32:
            return Vouch("sha256", ((0, size),), raw.hex(), "ChecksumSHA256")
    text = etag_text(etag)
    if _MD5_HEX.match(text):
        return Vouch("md5", ((0, size),), text, "ETag")
    multipart = _MULTIPART.match(text)
    if multipart and part_sizes:
        count = int(multipart.group(2))
        if len(part_sizes) != count or sum(part_sizes) != size or min(part_sizes) <= 0:
            return None
        ends = tuple(itertools.accumulate(part_sizes))
        bounds = tuple(zip((0, *ends[:-1]), ends))
        return Vouch("md5", bounds, multipart.group(1), "multipart ETag")
    return None


def multipart_count(etag: str) -> int | None:
    """The part count of a multipart ETag (``…-N``), else None."""
    found = _MULTIPART.match(etag_text(etag))
    return int(found.group(2)) if found else None


class FileCheck:
    """The object's bytes, fed in order from offset 0, against a :class:`Vouch`."""

    def __init__(self, vouch: Vouch) -> None:
        self.vouch = vouch
        self.offset = 0
        self._part = 0
        self._hasher = hashlib.new(vouch.algorithm)
        self._digests: list[bytes] = []

    @property
    def done(self) -> bool:
        return self.offset >= self.vouch.size

    def feed(self, data: bytes | memoryview) -> None:
        """The next bytes of the object (from :attr:`offset`)."""
        view = memoryview(data)
        if self.offset + len(view) > self.vouch.size:
            raise ValueError(f"fed {self.offset + len(view)} bytes of a {self.vouch.size}-byte object")
        while len(view):
            end = self.vouch.parts[self._part][1]
            take = min(len(view), end - self.offset)
            self._hasher.update(view[:take])
            view = view[take:]
            self.offset += take
            if self.offset == end:
                self._digests.append(self._hasher.digest())
                self._part += 1
                self._hasher = hashlib.new(self.vouch.algorithm)

    def matches(self) -> bool:
        """Once every byte is fed: do they hash to what the origin vouched for?"""
        if not self.done:
            raise ValueError(f"only {self.offset} of {self.vouch.size} bytes checked")
        if len(self.vouch.parts) == 1:
            found = self._digests[0].hex() if self._digests else hashlib.new(
                self.vouch.algorithm).hexdigest()
        else:
            found = hashlib.new(self.vouch.algorithm, b"".join(self._digests)).hexdigest()
        return found == self.vouch.expected
