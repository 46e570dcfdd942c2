"""Typed options of the library's entry points: what each script's flags mean, as dataclasses.

The command lines (the scripts through `tinyfusion.args`, and the applications' own) know argparse; the
library takes these. A field's name is its flag's (`--global-batch-size` -> `global_batch_size`), and its
default is the flag's.
"""

from __future__ import annotations

import dataclasses

from models.attention import attention_spec

from .distributed import default_num_workers
from .errors import UserError


@dataclasses.dataclass
class RuntimeOptions:
    """Where and how a process runs: device ("auto", "cuda", "cpu"), autocast precision, TF32."""

    device: str = "auto"
    precision: str = "auto"
    tf32: bool = True


@dataclasses.dataclass
class CompileOptions:
    """--compile: torch.compile what runs at every step, one graph or an error (models/compiling.py), with
    --compile-backend."""

    compile: bool = False
    compile_backend: str = "inductor"

    def compiled_with(self) -> str | None:
        """The backend to compile with; None without --compile.

        Raises:
            UserError: another --compile-backend without --compile (a flag that would change nothing).
        """
        if self.compile:
            return self.compile_backend
        if self.compile_backend != "inductor":
            raise UserError(f"--compile-backend {self.compile_backend} chooses how --compile compiles: add --compile")
        return None


@dataclasses.dataclass
class ModelOptions:
    """How a model is named and read: registry name, which weights, head count of a plain state dict, and the
    attention kind (`--attention`: what a bare state dict cannot say; the kind a training run converts to)."""

    model: str | None = None
    weights: str = "ema"
    num_heads: int | None = None
    attention: str | None = None
    attention_radius: float | None = None
    attention_pool: int = 1

    def stated_attention(self) -> dict | None:
        """The attention kind the flags state, validated (models/attention.py), or None when they state none.

        Raises:
            UserError: a radius or pooling factor without `--attention local`, or local attention without a radius.
        """
        if self.attention is None:
            if self.attention_radius is not None or self.attention_pool != 1:
                raise UserError("--attention-radius and --attention-pool describe local attention: add "
                                 "--attention local")
            return None
        if self.attention == "global":
            if self.attention_radius is not None or self.attention_pool != 1:
                raise UserError("--attention global takes no --attention-radius or --attention-pool; drop them, "
                                 "or say --attention local")
            return attention_spec({"kind": "global"})
        if self.attention_radius is None:
            raise UserError("--attention local needs --attention-radius R (tokens on the grid, e.g. 8)")
        radius = int(self.attention_radius) if float(self.attention_radius).is_integer() else self.attention_radius
        return attention_spec({"kind": "local", "radius": radius, "pool": self.attention_pool})


@dataclasses.dataclass
class TrainingOptions(RuntimeOptions, ModelOptions, CompileOptions):
    """The flags of the one training loop (tinyfusion.engine), shared by the three training scripts."""

    load_weight: str | None = None
    data_path: str = ""
    num_classes: int | None = None
    num_workers: int = dataclasses.field(default_factory=default_num_workers)
    results_dir: str = "results"
    prefix: str | None = None
    epochs: int | None = None
    max_steps: int | None = None
    log_every: int = 100
    ckpt_every: int = 10_000
    keep_last: int = 2
    tensorboard: bool = False
    max_nonfinite_steps: int = 5
    global_batch_size: int = 256
    micro_batch_size: int | None = None
    grad_checkpointing: bool = False
    lr: float = 1e-4
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    weight_decay: float | None = None  # None: the family's recipe (train.py, train_masked_kd.py), else 0
    adam_betas: list[float] | None = None  # None: the family's recipe, else (0.9, 0.999)
    grad_clip: float = 1.0
    ema_decay: float = 0.9999
    global_seed: int = 0


@dataclasses.dataclass
class TrainOptions(TrainingOptions):
    """train.py."""

    save_model: str | None = None


@dataclasses.dataclass
class MaskedKDOptions(TrainOptions):
    """train_masked_kd.py."""

    teacher: str | None = None
    load_teacher: str = ""
    teacher_weights: str = "ema"
    teacher_num_heads: int | None = None  # a bare teacher state dict of a non-official width (not --num-heads)
    alpha_kd: float = 0.9
    beta_feat: float = 1e-2
    mask_k: float = 2.0
    pred_weight: float = 0.5  # CLEAR (--attention local): gt + pred_weight * pred + attn_weight * attn
    attn_weight: float = 0.5
    layer_map: str | None = None


@dataclasses.dataclass
class LearnedPruningOptions(TrainingOptions):
    """prune_by_learning.py."""

    groups: list[str] | None = None
    tau_range: tuple[float, float] = (4.0, 0.1)
    scaling_range: tuple[float, float] = (1e2, 1e2)
    gate_lr_mult: float = 10.0
    delta_w: bool = False
    lora: bool = False
    lora_rank: int = 8
    lora_alpha: float | None = None
    lora_targets: list[str] = dataclasses.field(default_factory=lambda: ["all"])
    ema_decay: float | None = None  # None: from the run length (tinyfusion.pruning.gate_ema_decay)
    stop_at_confidence: float | None = None  # None: run every step
    save_model: str = ""


@dataclasses.dataclass
class ScorePruningOptions(RuntimeOptions, ModelOptions):
    """prune_by_score.py."""

    ckpt: str = ""
    global_seed: int = 0
    criterion: str = "bi"
    data_path: str | None = None
    num_batches: int | None = None  # None: 16 for the depth criteria, 1 for the Taylor width criterion
    batch_size: int = 32
    n_pruned: int | None = None
    target_depth: list[str] | None = None  # one depth, or per stack: STACK=DEPTH terms
    protect_first: int = 0
    protect_last: int = 0
    width_ratio: float | None = None  # None: no width pruning
    width_criterion: str = "taylor"
    global_width: bool = False
    taylor_threshold: float = 0.05
    save_model: str = ""
    save_scores: str | None = None


@dataclasses.dataclass
class IndexPruningOptions(ModelOptions):
    """prune_by_index.py: kept or pruned flat block indices (or per stack), or a preset."""

    ckpt: str = ""
    kept_indices: list[str] | None = None
    pruned_indices: list[str] | None = None
    preset: str | None = None
    target_depth: int | None = None
    save_model: str = ""


@dataclasses.dataclass
class DiffusersExportOptions(ModelOptions):
    """python -m tinyfusion.diffusers_io export: the checkpoint, the pipeline folder to write, the codec (--vae)."""

    ckpt: str = ""
    out: str = ""
    vae: str = "auto"


@dataclasses.dataclass
class DiffusersImportOptions:
    """python -m tinyfusion.diffusers_io import: the diffusers folder, the model file to write."""

    folder: str = ""
    save_model: str = ""


@dataclasses.dataclass
class SamplingOptions(RuntimeOptions, ModelOptions, CompileOptions):
    """The flags shared by sample.py and sample_ddp.py."""

    ckpt: str = ""
    cfg_scale: float | None = None  # None: the family's published scale, else default_cfg_scale
    default_cfg_scale: float = 4.0
    guide_all_channels: bool = False
    num_sampling_steps: int | None = None
    sampler: str | None = None
    vae: str = "auto"
    # Sampler options (None: the sampler's default; see processes.NoiseProcess.sampler_options).
    sampling_method: str | None = None
    atol: float | None = None
    rtol: float | None = None
    diffusion_form: str | None = None
    diffusion_norm: float | None = None
    last_step: str | None = None
    last_step_size: float | None = None
    num_iter: int | None = None
    cfg_schedule: str | None = None
    temperature: float | None = None


SAMPLER_OPTION_FIELDS = ("sampling_method", "atol", "rtol", "diffusion_form", "diffusion_norm", "last_step",
                         "last_step_size", "num_iter", "cfg_schedule", "temperature")


@dataclasses.dataclass
class SampleGridOptions(SamplingOptions):
    """sample.py."""

    seed: int = 0
    class_labels: list[int] | None = None
    out: str | None = None


@dataclasses.dataclass
class SampleSetOptions(SamplingOptions):
    """sample_ddp.py."""

    global_seed: int = 0
    num_fid_samples: int = 50_000
    per_proc_batch_size: int = 32
    sample_dir: str = "outputs/samples"
    npz: str | None = None
    save_png: bool = False
    save_latents: str | None = None
