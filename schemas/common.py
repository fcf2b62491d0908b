"""Config parts shared by every job: the strict base model and the object-storage settings."""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from clipn_core.named_sets import template_set_names
from clipn_core.storage import Storage


def _dot_lower(extensions: list[str]) -> list[str]:
    if not extensions:
        raise ValueError("at least one extension is needed")
    return [("." + e.lstrip(".")).lower() for e in extensions]


PRETRAINED_CONFIG_HELP = (
    "the open_clip pretrained tag whose configuration (QuickGELU or GELU activations, preprocessing) a weights file "
    "follows, e.g. openai for OpenAI's weights saved to a file; plain: the architecture's own config (weights "
    "trained by clipn train --stage clip). Unset: a tag in pretrained names its own, a file gets plain with a "
    "warning where the architecture has QuickGELU-trained tags")

TEMPLATES_HELP = (f"a template set by name ({', '.join(template_set_names())}; default: default) or a template file "
                  "URI, one template per line with one {}, taken as it is")


# File extensions as ".jpg"-style lower-case strings; "JPG" and ".Jpg" are accepted.
FileExtensions = Annotated[list[str], AfterValidator(_dot_lower)]


class StrictModel(BaseModel):
    """Base of every config model: unknown fields are errors, defaults are validated too."""

    model_config = ConfigDict(extra="forbid", validate_default=True)


class StorageConfig(StrictModel):
    """Object-storage settings shared by inputs, outputs and model URIs (s3fs).

    Credentials are never part of the config: they come from the environment
    (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY), a profile, or the instance role.
    """

    endpoint_url: str | None = Field(None, description="S3-compatible endpoint, e.g. http://minio:9000")
    region: str | None = Field(None, description="S3 region name")
    anon: bool = Field(False, description="anonymous (unsigned) access")
    profile: str | None = Field(None, description="AWS profile name from ~/.aws/credentials")
    max_attempts: int = Field(10, ge=1, description="attempts per S3 request, the first included: 500/503 SlowDown, "
                              "throttling and connection errors are retried with exponential backoff and jitter")
    connect_timeout_s: float = Field(10.0, gt=0, description="S3 connect timeout (seconds)")
    read_timeout_s: float = Field(60.0, gt=0, description="S3 read timeout (seconds); a slower response is retried")
    max_connections: int = Field(64, ge=1, description="S3 connections kept open per process (botocore's pool; "
                                 "fetches beyond it queue)")

    def storage_options(self) -> dict:
        """fsspec / s3fs storage options for these settings (local paths ignore them).

        This is the one place where retries are configured: botocore's ``standard`` retry
        mode: ``max_attempts`` per request, exponential backoff with jitter, for 5xx,
        SlowDown / throttling and connection errors; s3fs wraps each call in its own fixed
        loop of 5 attempts on top. Every reader and writer (Ray Data, Ray Train storage,
        checkpoints, publishing) gets its filesystem from these options.
        """
        opts: dict = {
            "anon": self.anon,
            "config_kwargs": {"retries": {"max_attempts": self.max_attempts, "mode": "standard"},
                              "connect_timeout": self.connect_timeout_s, "read_timeout": self.read_timeout_s,
                              "max_pool_connections": self.max_connections},
        }
        if self.profile:
            opts["profile"] = self.profile
        client = {k: v for k, v in (("endpoint_url", self.endpoint_url), ("region_name", self.region)) if v}
        if client:
            opts["client_kwargs"] = client
        return opts

    def bind(self) -> Storage:
        """The :class:`~clipn_core.storage.Storage` every stage of a job reads and writes through."""
        return Storage(self.storage_options())
