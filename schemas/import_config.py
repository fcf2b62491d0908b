"""Config of ``clipn import-original``: released CLIPN weights -> a checkpoint the nightly job loads."""

from __future__ import annotations

from pydantic import Field, field_validator

from schemas.common import StorageConfig, StrictModel


class ImportJobConfig(StrictModel):
    """Convert a checkpoint of the original CLIPN code (a ``.pt`` with ``state_dict``, e.g. the released ViT-B-16
    trained on CC3M) into a clipn-lake checkpoint (``.safetensors`` + ``.json`` sidecar), loading it with
    ``weights_only`` and strict keys."""

    checkpoint: str = Field(..., description="the original .pt file (local path or s3:// URI)")
    architecture: str = Field("ViT-B-16", description="open_clip architecture the checkpoint was trained on")
    output: str = Field(..., description="where to write the clipn-lake checkpoint (.safetensors; the .json sidecar "
                        "goes beside it)")
    cache_dir: str | None = Field(None, description="local cache of downloaded files")
    storage: StorageConfig = Field(default_factory=StorageConfig)

    @field_validator("output")
    @classmethod
    def _safetensors(cls, v: str) -> str:
        if not v.endswith(".safetensors"):
            raise ValueError("must end with .safetensors")
        return v
