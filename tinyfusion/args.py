"""Command-line argument groups shared by the scripts, so a flag means one thing everywhere.

The one library module that knows argparse: scripts build their parser from these groups and hand
the library a typed options dataclass (`to_options`).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from typing import TypeVar

from models import ARCHITECTURES, MODELS, plain_names
from models.attention import ATTENTION_KINDS
from models.compiling import BACKENDS as COMPILE_BACKENDS
from processes import all_samplers
from transport import DIFFUSION_FORMS

from .distributed import default_num_workers
from .precision import PRECISIONS

T = TypeVar("T")


class Parser(argparse.ArgumentParser):
    """argparse with the script's docstring as description, defaults shown in --help, a --debug flag, and
    errors on one line (rank 0 only under torchrun), exit status 2."""

    def __init__(self, doc: str | None, **kwargs):
        super().__init__(description=doc, formatter_class=_Formatter, allow_abbrev=False, **kwargs)
        self.add_argument("--debug", action="store_true",
                          help="show the Python traceback of an error (errors are otherwise one line)")

    def error(self, message: str):
        if os.environ.get("RANK", "0") == "0":
            print(f"{self.prog}: error: {message} (see {self.prog} --help)", file=sys.stderr, flush=True)
        sys.exit(2)


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Every option's line ends with its default, once: not for required options, flags that are off, or options
    whose help already says what happens by default."""

    def _format_action(self, action: argparse.Action) -> str:
        if action.help is None and self._default_text(action):
            action.help = f"({self._default_text(action)})".replace("%", "%%")  # a line for the default alone
        return super()._format_action(action)

    def _expand_help(self, action: argparse.Action) -> str:
        text = super()._expand_help(action)
        default = self._default_text(action)
        if default and "default" not in text.lower():
            text = f"{text} ({default})" if text else f"({default})"
        return text

    @staticmethod
    def _default_text(action: argparse.Action) -> str:
        if action.required or not action.option_strings or any(action.default is v for v in (None, False,
                                                                                              argparse.SUPPRESS)):
            return ""
        if isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
            return ""
        value = " ".join(map(str, action.default)) if isinstance(action.default, (list, tuple)) else action.default
        return f"default: {value}"


def positive_int(text: str) -> int:
    """An argparse type: an integer of at least 1 (a count, a period)."""
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def nonnegative_int(text: str) -> int:
    """An argparse type: an integer of at least 0."""
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def to_options(cls: type[T], args: argparse.Namespace) -> T:
    """The options dataclass `cls` filled from parsed arguments (field name = flag name).

    Raises:
        TypeError: a parsed argument that `cls` has no field for (a script and its options disagree).
    """
    names = {f.name for f in dataclasses.fields(cls)}
    values = {k: v for k, v in vars(args).items() if k != "debug"}  # --debug is the script's (tinyfusion.cli)
    extra = sorted(set(values) - names)
    if extra:
        raise TypeError(f"{cls.__name__} has no field for the arguments {extra}")
    return cls(**values)


def add_runtime_args(parser: argparse.ArgumentParser, *, precision_default: str = "auto",
                     seed_flag: str = "--global-seed", sampling: bool = False) -> None:
    """--device, --precision, --tf32 and the seed (`seed_flag`: sample.py says --seed, as DiT's does). `sampling`: the
    precision is the inference path's (weights held in it), not autocast's."""
    group = parser.add_argument_group("runtime")
    group.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto",
                       help="auto uses CUDA when a GPU is visible; the GPU is LOCAL_RANK under torchrun")
    group.add_argument("--precision", choices=["auto", *PRECISIONS], default=precision_default,
                       help=("the inference path's precision: the blocks' attention and MLP weights held in bf16 or "
                             "fp16, embeddings, adaLN and the final layer in fp32" if sampling else
                             "autocast precision (the weights stay fp32)")
                       + "; auto is bf16 on CUDA GPUs that support it, else fp32")
    group.add_argument("--tf32", action=argparse.BooleanOptionalAction, default=True,
                       help="allow TF32 matmuls on Ampere+ GPUs")
    group.add_argument(seed_flag, type=int, default=0)


def add_model_args(parser: argparse.ArgumentParser, *, ckpt_flag: str = "--ckpt", ckpt_required: bool = False,
                   allow_gated: bool = False) -> None:
    """--model (a registry name), the checkpoint flag, --weights and --num-heads."""
    choices = (list(MODELS) + list(ARCHITECTURES)) if allow_gated else plain_names(families=True)
    group = parser.add_argument_group("model")
    group.add_argument("--model", choices=choices, default=None, metavar="NAME",
                       help="registry model; optional when the checkpoint describes itself, required for a bare "
                            "state dict (official DiT and SiT files share one layout). A family name alone (DiT, "
                            f"SiT) takes the sizes from the weights. Choices: {', '.join(choices)}")
    group.add_argument(ckpt_flag, type=str, required=ckpt_required, default=None,
                       help="checkpoint: official DiT, SiT or MAR weights, a training checkpoint, a TinyFusion or "
                            "toolkit file, or .safetensors")
    group.add_argument("--weights", choices=["ema", "model"], default="ema",
                       help="which weights of a training checkpoint to use")
    group.add_argument("--num-heads", type=int, default=None,
                       help="head count, for plain state dicts of non-official widths")
    group.add_argument("--attention", choices=list(ATTENTION_KINDS), default=None,
                       help="attention kind: what a bare state dict cannot say (it loads as global otherwise); a file "
                            "of ours records its kind. train.py and train_masked_kd.py convert the model they train "
                            "to this kind (CLEAR: --attention local --attention-radius R)")
    group.add_argument("--attention-radius", type=float, default=None, metavar="R",
                       help="local attention: each token attends to the tokens of the grid closer than R")
    group.add_argument("--attention-pool", type=positive_int, default=1, metavar="F",
                       help="local attention: also attend to keys and values average-pooled over FxF cells "
                            "(CLEAR's down_factor); 1: off")


def add_sampling_args(parser: argparse.ArgumentParser, *, cfg_default: float = 4.0) -> None:
    group = parser.add_argument_group("sampling")
    group.add_argument("--cfg-scale", type=float, default=None,
                       help=f"classifier-free guidance scale; 1.0 disables guidance. None: the family's published "
                            f"scale (MAR-B/L/H 2.9/3.0/3.2, on the linear schedule), else {cfg_default:g}")
    parser.set_defaults(default_cfg_scale=cfg_default)
    group.add_argument("--guide-all-channels", action="store_true",
                       help="guide every noise channel (the official code guides the first 3 only)")
    add_compile_args(group, "the sampler's denoiser (the model's forward, guidance included)")
    group.add_argument("--num-sampling-steps", type=positive_int, default=None,
                       help="steps of the sampler; None: the sampler's default (Gaussian: ddpm and ddim 250, dpm++ "
                            "and unipc 20, dpm++-sde 25, euler-a and ddim-hf 50)")
    group.add_argument("--sampler", choices=all_samplers(), default=None,
                       help="a sampler of the model's noise process; None: its first. Gaussian (DiT): ddpm "
                            "(ancestral), ddim (eta 0), and diffusers' schedulers: dpm++ (DPM-Solver++ 2M), dpm++-sde "
                            "(its SDE variant), unipc (UniPC), euler-a (Euler ancestral), ddim-hf (DDIMScheduler); "
                            "transport (SiT): ode "
                            "(probability flow), sde; masked tokens (MAR): mar (--num-sampling-steps are the "
                            "token sampler's, 100 by default)")
    group = parser.add_argument_group("transport samplers (SiT); unset: the official defaults")
    group.add_argument("--sampling-method", type=str, default=None,
                       help="ode: dopri5 (adaptive, default), euler, heun, or another torchdiffeq method; "
                            "sde: Euler (default) or Heun")
    group.add_argument("--atol", type=float, default=None, help="ode: absolute tolerance of adaptive methods (1e-6)")
    group.add_argument("--rtol", type=float, default=None, help="ode: relative tolerance of adaptive methods (1e-3)")
    group.add_argument("--diffusion-form", type=str, default=None,
                       choices=list(DIFFUSION_FORMS),
                       help="sde: the diffusion coefficient w_t (SBDM)")
    group.add_argument("--diffusion-norm", type=float, default=None, help="sde: scale of w_t (1.0)")
    group.add_argument("--last-step", type=str, default=None, choices=["Mean", "Tweedie", "Euler", "None"],
                       help="sde: the noiseless last step (Mean)")
    group.add_argument("--last-step-size", type=float, default=None, help="sde: size of the last step (0.04)")
    group = parser.add_argument_group("masked-token sampler (MAR); unset: the official defaults")
    group.add_argument("--num-iter", type=positive_int, default=None,
                       help="mar: autoregressive iterations of the cosine masking schedule (64)")
    group.add_argument("--cfg-schedule", choices=["linear", "constant"], default=None,
                       help="mar: guidance grows linearly with the generated tokens, or stays constant (linear)")
    group.add_argument("--temperature", type=float, default=None,
                       help="mar: scale of the token sampler's noise (1.0)")
    add_vae_arg(group)


def add_compile_args(group, what: str, refused: str = "") -> None:
    """--compile and --compile-backend (the sampling and the training scripts alike; models/compiling.py)."""
    group.add_argument("--compile", action="store_true",
                       help=f"torch.compile {what} as one graph: a graph break or too many recompilations is an "
                            "error, never a silent fallback to eager code. Off by default: on one CPU core DiT-S/2 "
                            "sampled 0.98x (fp32) and 1.10x (bf16 autocast) as fast end to end with it, its denoiser "
                            "alone 1.2-1.3x, and 1.07x on the bf16 inference path, after about 40 s of compiling "
                            "(README, Speed). DiT and SiT; MAR is refused "
                            f"(data-dependent shapes of its random masking, Python loops in its sampler){refused}")
    group.add_argument("--compile-backend", choices=list(COMPILE_BACKENDS), default="inductor",
                       help="inductor generates code; aot_eager and eager capture the graph without generating code "
                            "(a cheap check that a model compiles)")


def add_vae_arg(group) -> None:
    """--vae: the codec of a model's latents, as the samplers and the diffusers export take it."""
    group.add_argument("--vae", type=str, default="auto",
                       help="auto (the codec the checkpoint records; for files that record none, SD-VAE ema for "
                            "4 channels, KL-16 for 16 and pixels for 3), ema or mse (stabilityai/sd-vae-ft-*), a local "
                            "diffusers folder, kl16 or a path to MAR's kl16.ckpt, or none (pixels)")


def add_training_args(parser: argparse.ArgumentParser, *, global_batch_size: int, ema_decay: float | None,
                      lr: float = 1e-4, ema_help: str | None = None) -> None:
    """The flags of the one training loop (tinyfusion.engine), shared by the three training scripts."""
    group = parser.add_argument_group("data")
    group.add_argument("--data-path", type=str, required=True,
                       help="features folder written by extract_features.py (or the reference layout)")
    group.add_argument("--num-classes", type=int, default=None,
                       help="classes of a model trained from scratch; read from the features when omitted")
    group.add_argument("--num-workers", type=nonnegative_int, default=default_num_workers(),
                       help="data-loading workers per process (default: the cores of this machine per process, "
                            "less one, at most 8)")

    group = parser.add_argument_group("run")
    group.add_argument("--results-dir", type=str, default="results")
    group.add_argument("--prefix", type=str, default=None,
                       help="run folder name under --results-dir (default: from the script and model); "
                            "running the same command again resumes the run in it")
    group.add_argument("--epochs", type=positive_int, default=None)
    group.add_argument("--max-steps", type=positive_int, default=None,
                       help="train for this many steps instead of --epochs")
    group.add_argument("--log-every", type=positive_int, default=100)
    group.add_argument("--ckpt-every", type=positive_int, default=10_000)
    group.add_argument("--keep-last", type=positive_int, default=2, help="training checkpoints to keep")
    group.add_argument("--tensorboard", action="store_true", help="also log to run_dir/tensorboard")
    group.add_argument("--max-nonfinite-steps", type=positive_int, default=5,
                       help="stop after this many consecutive steps with a non-finite loss or gradient")

    group = parser.add_argument_group("optimisation")
    group.add_argument("--global-batch-size", type=positive_int, default=global_batch_size)
    group.add_argument("--micro-batch-size", type=positive_int, default=None,
                       help="per-process batch of one forward pass; gradients accumulate up to the "
                            "per-process share of --global-batch-size (default: all of it at once)")
    group.add_argument("--grad-checkpointing", action="store_true",
                       help="recompute block activations in the backward pass to save memory (gated blocks "
                            "included); the same losses and gradients")
    add_compile_args(group, "the trained model's forward (gates, LoRA included; under DDP, DDP wraps it)",
                     ", as are gated blocks (prune_by_learning.py) with --grad-checkpointing")
    group.add_argument("--lr", type=float, default=lr)
    group.add_argument("--lr-schedule", choices=["constant", "cosine"], default="constant")
    group.add_argument("--warmup-steps", type=nonnegative_int, default=0)
    group.add_argument("--weight-decay", type=float, default=None,
                       help="AdamW weight decay; None: the family's recipe in train.py and train_masked_kd.py "
                            "(DiT, SiT 0; MAR 0.02), else 0")
    group.add_argument("--adam-betas", type=float, nargs=2, default=None, metavar=("BETA1", "BETA2"),
                       help="AdamW betas; None: the family's recipe in train.py and train_masked_kd.py (DiT, SiT "
                            "0.9 0.999; MAR 0.9 0.95), else 0.9 0.999")
    group.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm; 0 disables clipping")
    group.add_argument("--ema-decay", type=float, default=ema_decay, help=ema_help or "EMA decay of the weights")


def add_recovery_args(parser: argparse.ArgumentParser) -> None:
    """Flags of the scripts that train a model to keep (train.py, train_masked_kd.py)."""
    parser.add_argument("--save-model", type=str, default=None,
                        help="also write the final model (weights and EMA, no optimizer) to this file")


def diffusers_io_parser(doc: str | None) -> Parser:
    """The command line of `python -m tinyfusion.diffusers_io`: `export` (a checkpoint to a diffusers pipeline folder)
    and `import` (a diffusers DiT folder to a toolkit file)."""
    parser = Parser(doc)
    commands = parser.add_subparsers(dest="command", required=True, metavar="{export,import}")
    export = commands.add_parser("export", doc="Write a checkpoint's DiT as a diffusers DiTPipeline folder.",
                                 help="a checkpoint to a diffusers pipeline folder")
    add_model_args(export, ckpt_flag="--ckpt", ckpt_required=True)
    export.add_argument("--out", type=str, required=True,
                        help="the pipeline folder to write (an earlier export there is replaced)")
    add_vae_arg(export.add_argument_group("codec"))
    imported = commands.add_parser("import", doc="Write a diffusers DiT (a pipeline folder or its transformer/ "
                                   "folder) as this toolkit's self-describing file.",
                                   help="a diffusers DiT folder to a toolkit model file")
    imported.add_argument("--folder", type=str, required=True,
                          help="a diffusers pipeline folder (model_index.json) or its transformer/ folder")
    imported.add_argument("--save-model", type=str, required=True, help="the model file to write (.pt or .safetensors)")
    return parser
