"""Config of ``clipn import-original``: released CLIPN weights -> a checkpoint the nightly job loads."""

from __future__ import annotations

from pydantic import Field, field_validator, model_validator

from schemas.common import StorageConfig, StrictModel


class ImportJobConfig(StrictModel):
    """Convert a checkpoint of the original CLIPN code (a ``.pt`` with ``state_dict``, e.g. the released ViT-B-16
    trained on CC3M) into a clipn-lake checkpoint (``.safetensors`` + ``.json`` sidecar), loading it with
    ``weights_only`` and strict keys."""

    checkpoint: str = Field(..., description="the original .pt file (local path or s3:// URI)")
    architecture: str = Field("ViT-B-16", description="open_clip architecture the checkpoint was trained on")
    pretrained_config: str = Field(
        "laion2b_s34b_b88k", description="the open_clip pretrained tag the base CLIP was trained from (the original "
        "code trains over ViT-B-16 / laion2b_s34b_b88k, a GELU model): its activation and preprocessing are what the "
        "imported model is built with; plain: the architecture's own config")
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


class UpgradeCheckpointConfig(StrictModel):
    """Re-save a clipn-lake checkpoint built from its base weights' pretrained configuration (QuickGELU for OpenAI's
    weights and 26 more open_clip tags): for checkpoints written before base CLIPs were built that way, which
    ``clipn score`` refuses. Same weights, a new model id."""

    checkpoint: str = Field(..., description="the checkpoint to upgrade (.safetensors with its .json sidecar)")
    output: str = Field(..., description="where to write the upgraded checkpoint (.safetensors; never the input)")
    pretrained_config: str | None = Field(None, description="the open_clip tag the base weights were trained as, "
                                          "for checkpoints whose base weights were a file (none: the recorded tag)")
    cache_dir: str | None = Field(None, description="local cache of downloaded files")
    storage: StorageConfig = Field(default_factory=StorageConfig)

    @field_validator("checkpoint", "output")
    @classmethod
    def _safetensors(cls, v: str) -> str:
        if not v.endswith(".safetensors"):
            raise ValueError("must end with .safetensors")
        return v

    @model_validator(mode="after")
    def _not_in_place(self):
        if self.output == self.checkpoint:
            raise ValueError("output must differ from checkpoint (the old model id stays valid for what it made)")
        return self
