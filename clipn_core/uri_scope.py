"""Manifest lines: which URIs the job may fetch, decided before any request.

A manifest is data, and its lines may name anything fsspec can open. A line is fetched
only when it is a well-formed absolute URI inside the input's scope; every other line
keeps its row, with status ``invalid_uri`` and an error naming the reason, and is never
turned into a path or fetched. Malformed lines:

- null (kept as ``""``: the output's ``uri`` column is not nullable), empty, whitespace only;
- not a string (a numeric URI column);
- a relative path (``a.jpg``, ``./a.jpg``, ``~/a.jpg``: they would resolve against the
  worker's working directory), a ``file://`` URI with a host;
- unparsable (``urlsplit`` refuses it, a NUL character), a chained fsspec URL (any ``::``,
  as in ``simplecache::s3://...``), dot segments (``/./``, ``/../``) in a remote URI;
- outside the scope.

The scope is the manifest's own store: for a local manifest the local filesystem
(absolute paths and ``file:///`` URIs); for a remote one its protocol and bucket (or
container, or host: the first component after ``://``), ``s3a://`` counting as ``s3://`` and ``gcs://`` as ``gs://``.
``input.allowed_uri_prefixes`` adds folders (``s3://other-bucket/images/``,
``/mnt/lake/``); a local path is compared after normalising its dot segments.
"""

from __future__ import annotations

import posixpath
import re
from dataclasses import dataclass
from urllib.parse import urlsplit

from .errors import InputError, redact_uri

_PROTOCOL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_LOCAL = ("file", "local")
_ALIASES = {"s3a": "s3", "gcs": "gs"}  # fsspec's other names for one store


class InvalidUriError(InputError):
    """A manifest line that is not fetched: malformed, or outside the input's scope (the row's ``invalid_uri``)."""


def _normal(value: str) -> tuple[str | None, str]:
    """(the URI in the form scopes are compared in, or None; the reason when None). Local paths become
    normalised absolute paths, remote URIs ``protocol://rest`` with protocol aliases resolved."""
    if "\x00" in value:
        return None, "unparsable uri (a NUL character)"
    try:
        urlsplit(value)
    except ValueError as e:
        return None, f"unparsable uri ({e})"
    if "::" in value:  # fsspec would chain filesystems (simplecache::s3://..., s3://a::http://...)
        return None, "a chained fsspec URL"
    found = _PROTOCOL.match(value)
    if found is None:
        if not value.startswith("/"):
            return None, "a relative path (manifest lines must be absolute URIs or paths)"
        return posixpath.normpath(value), ""
    protocol, rest = found.group(1).lower(), value[found.end():]
    if protocol in _LOCAL:
        if not rest.startswith("/"):
            return None, "a file URI with a host (file:///absolute/path expected)"
        return posixpath.normpath(rest), ""
    if not rest.split("/", 1)[0]:
        return None, "a URI without a bucket or host"
    if any(part in (".", "..") for part in rest.split("/")[1:]):
        return None, "dot segments in a remote URI"
    return f"{_ALIASES.get(protocol, protocol)}://{rest}", ""


def _as_folder(prefix: str) -> str:
    return prefix if prefix.endswith("/") else prefix + "/"


def prefix_problem(prefix: str) -> str | None:
    """Why ``prefix`` cannot be an allowed URI prefix (config check), or None."""
    if not prefix.strip():
        return "empty"
    normal, reason = _normal(prefix)
    return None if normal is not None else reason


@dataclass(frozen=True)
class UriScope:
    """The folders manifest lines may point into: normalised, each ending in ``/`` (``/`` alone: the whole local
    filesystem)."""

    prefixes: tuple[str, ...]

    @classmethod
    def for_manifest(cls, manifest_uri: str, allowed: list[str] | tuple[str, ...] = ()) -> UriScope:
        """The manifest's own store (module docstring) plus ``allowed`` (``input.allowed_uri_prefixes``,
        already checked by the config). Raises :class:`InputError` for a manifest URI it cannot place."""
        found = _PROTOCOL.match(manifest_uri)
        if found is None or found.group(1).lower() in _LOCAL:
            home = "/"  # a local manifest (a relative path too): the local filesystem
        else:
            own, reason = _normal(manifest_uri)
            if own is None:
                raise InputError(f"input.uri {redact_uri(manifest_uri)}: {reason}")
            protocol, rest = own.split("://", 1)
            home = f"{protocol}://{rest.split('/', 1)[0]}/"
        extra = []
        for prefix in allowed:
            normal, reason = _normal(prefix)
            if normal is None:
                raise InputError(f"input.allowed_uri_prefixes: {redact_uri(prefix)}: {reason}")
            extra.append(_as_folder(normal))
        return cls((home, *extra))

    def problem(self, value: object) -> str | None:
        """Why the manifest line ``value`` must not be fetched (module docstring), or None when it may be."""
        if value is None:
            return "null uri"
        if not isinstance(value, str):
            return f"not a string ({type(value).__name__})"
        if not value:
            return "empty uri"
        if not value.strip():
            return "whitespace-only uri"
        normal, reason = _normal(value)
        if normal is None:
            return reason
        if any(normal.startswith(p) for p in self.prefixes):
            return None
        return f"outside the input's store (allowed: {', '.join(map(redact_uri, self.prefixes))}; " \
               f"input.allowed_uri_prefixes adds more)"

    def check(self, value: object) -> None:
        """Raise :class:`InvalidUriError` naming the line (redacted) and the reason unless it may be fetched."""
        reason = self.problem(value)
        if reason is not None:
            shown = repr(redact_uri(value)) if isinstance(value, str) else "(null)" if value is None else repr(value)
            raise InvalidUriError(f"manifest line {shown} not fetched: {reason}")


def uri_text(value: object) -> str:
    """The ``uri`` column's value for a manifest line: the line itself, ``""`` for a null one."""
    return "" if value is None else str(value)
