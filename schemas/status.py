"""The ``status`` values of output rows: ``ok``, ``read_error``, ``invalid_uri`` (a manifest line not fetched:
malformed or outside the input's store) or why the image could not be decoded.

Kept apart from :mod:`schemas.output` (which builds the schema from the score registry,
and so loads torch) so that decode workers can name statuses cheaply.
"""

from __future__ import annotations

from clipn_core.images import DecodeErrorKind

STATUS_OK = "ok"
STATUS_READ_ERROR = "read_error"
STATUS_INVALID_URI = "invalid_uri"
STATUSES: tuple[str, ...] = (STATUS_OK, STATUS_READ_ERROR, STATUS_INVALID_URI, *(k.value for k in DecodeErrorKind))

TRANSIENT_STATUSES: frozenset[str] = frozenset({STATUS_READ_ERROR})
"""Failures that may not happen again (a timeout, a throttled or dropped request, an object not yet there): retried
on the following nights, up to ``output.retry_nights`` of them."""
PERMANENT_STATUSES: frozenset[str] = frozenset({STATUS_INVALID_URI, *(k.value for k in (
    DecodeErrorKind.EMPTY, DecodeErrorKind.NOT_AN_IMAGE, DecodeErrorKind.TRUNCATED, DecodeErrorKind.TOO_LARGE,
    DecodeErrorKind.UNSUPPORTED_MODE, DecodeErrorKind.DECODE_ERROR))})
"""Failures of the object itself (its bytes or its URI): the same object fails the same way, so it is scored again
only when it changed. Every status is ``ok``, transient or permanent, exactly one of them."""

LEFT_OUT_DUPLICATE_MEMBER = "duplicate_member"
LEFT_OUT_REASONS: tuple[str, ...] = ("extension", "watermark", "unencodable_name", "unreadable_folder", "not_a_file",
                                     LEFT_OUT_DUPLICATE_MEMBER)
"""Why something met on the way is not an input: the keys of the run manifest's ``left_out`` (a prefix listing's
entries, a tar shard's members)."""
