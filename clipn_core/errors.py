"""Typed exceptions raised by clipn_core.

Every error names what is at fault (a key, a field, a URI) so a user can act on it
without reading a traceback. URIs are passed through :func:`redact_uri` before they
appear in a message, so signed URLs and inline credentials never reach logs.
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit, urlunsplit

_SIGNED_QUERY = re.compile(r"(?i)(signature|credential|token|key|sig|secret)=")


def redact_uri(uri: str) -> str:
    """Return ``uri`` with user info and signed-query parameters removed.

    ``s3://AKIA...:secret@bucket/key`` -> ``s3://bucket/key``; a query string that
    carries a signature or credential is replaced by ``?<redacted>``.
    """
    try:
        parts = urlsplit(str(uri))
    except ValueError:
        return "<unparseable uri>"
    netloc = parts.netloc.rsplit("@", 1)[-1]
    query = "<redacted>" if parts.query and _SIGNED_QUERY.search(parts.query) else parts.query
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


class ClipnError(Exception):
    """Base class of every error clipn_core raises on purpose."""


class ModelConfigError(ClipnError):
    """An architecture name or config that open_clip / CLIPN cannot build."""


class WeightsError(ClipnError):
    """Weights that cannot be resolved, read or matched to the model."""


class CheckpointKeyError(WeightsError):
    """A state dict whose keys or shapes do not match the model exactly.

    Attributes hold the offending key lists so callers and tests can inspect them.
    """

    def __init__(
        self,
        source: str,
        missing: list[str] | None = None,
        unexpected: list[str] | None = None,
        mismatched: list[tuple[str, tuple, tuple]] | None = None,
        note: str | None = None,
    ):
        self.source = source
        self.missing = sorted(missing or [])
        self.unexpected = sorted(unexpected or [])
        self.mismatched = sorted(mismatched or [])
        parts = []
        if self.missing:
            parts.append(f"missing keys {_preview(self.missing)}")
        if self.unexpected:
            parts.append(f"unexpected keys {_preview(self.unexpected)}")
        if self.mismatched:
            shown = [f"{k}: checkpoint {tuple(a)} vs model {tuple(b)}" for k, a, b in self.mismatched]
            parts.append(f"mis-shaped keys {_preview(shown)}")
        what = note or "does not match the model"
        super().__init__(f"checkpoint {source} {what}: " + "; ".join(parts))


class TemplateError(ClipnError):
    """Prompt templates that are missing, empty or lack the ``{}`` placeholder."""


class ClassListError(ClipnError):
    """An ID class list that is empty or has duplicates."""


class StorageError(ClipnError):
    """An object-storage URI that cannot be read or written."""


class CalibrationError(ClipnError):
    """A calibration that cannot be read, or that does not fit the run using it (another model, class set or
    logit scale, or a threshold it does not hold)."""


class CacheError(ClipnError):
    """A local cache entry that cannot be read or does not hold what its key says (the jobs rebuild it)."""


class CommitConflictError(ClipnError):
    """A table commit that kept losing to concurrent writers after every retry."""


class CommitUnknownError(ClipnError):
    """A table commit whose outcome the catalog could not confirm either way; the run's data files are kept."""


class LeaseHeldError(ClipnError):
    """Another live run holds the lease of the same output and night; this run wrote nothing.

    ``exit_code`` is what ``clipn score`` exits with (75, ``EX_TEMPFAIL``: try again later)."""

    exit_code = 75


class LeaseLostError(ClipnError):
    """A run's lease on its night was taken over (its heartbeat looked dead to another run); it publishes nothing."""


class DriftAlertError(ClipnError):
    """The drift check of a scoring run's ``alerts:`` found something and ``alerts.fail`` is set; the night is
    published all the same (its manifest records the findings).

    ``exit_code`` is what ``clipn score`` exits with (3)."""

    exit_code = 3


class InputError(ClipnError, ValueError):
    """A job's configured input is missing, empty or malformed (raised before any work starts)."""


def _preview(items: list, limit: int = 8) -> str:
    shown = ", ".join(str(i) for i in items[:limit])
    more = f" (+{len(items) - limit} more)" if len(items) > limit else ""
    return f"[{shown}]{more}"
