"""Config parts shared by every job: the strict base model and the object-storage settings."""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field


def _dot_lower(extensions: list[str]) -> list[str]:
    if not extensions:
        raise ValueError("at least one extension is needed")
    return [("." + e.lstrip(".")).lower() for e in extensions]


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

    def storage_options(self) -> dict:
        """fsspec / s3fs storage options for these settings (local paths ignore them)."""
        opts: dict = {"anon": self.anon}
        if self.profile:
            opts["profile"] = self.profile
        client = {k: v for k, v in (("endpoint_url", self.endpoint_url), ("region_name", self.region)) if v}
        if client:
            opts["client_kwargs"] = client
        return opts
