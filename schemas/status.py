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
