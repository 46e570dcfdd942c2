r"""DiT in and out of diffusers: a pipeline folder that `diffusers.DiTPipeline` loads, and back.

Usage:
    python -m tinyfusion.diffusers_io export --ckpt outputs/pruned/DiT-D14-Learned.pt --out exported/DiT-D14
    python -m tinyfusion.diffusers_io export --model DiT-XL/2 --ckpt pretrained/DiT-XL-2-256x256.pt --vae vae \
        --out exported/DiT-XL-2
    python -m tinyfusion.diffusers_io import --folder exported/DiT-D14 --save-model DiT-D14.pt

Export writes a pipeline folder:
- `transformer/`: a `DiTTransformer2DModel` (config.json, diffusion_pytorch_model.safetensors) with the
  checkpoint's weights through `KEY_MAP`; a depth-pruned model is a transformer with fewer layers;
- `scheduler/`: a `DDIMScheduler` on the checkpoint's Gaussian process (DiT's: linear betas 1e-4 to 0.02 over
  1000 steps, noise prediction), without clipping of the predicted x_0 (the official DiT samplers clip none);
- `vae/`: a copy of the codec when it is a local diffusers folder (recorded by the checkpoint, or given with
  `--vae FOLDER`). Otherwise no VAE is copied (nothing is downloaded): `model_index.json` lists the vae as
  `[null, null]` and names the one to use under `_tinyfusion.vae` (e.g. `stabilityai/sd-vae-ft-ema`, what
  `--vae ema` means here), which is passed at loading:
  `DiTPipeline.from_pretrained(FOLDER, vae=AutoencoderKL.from_pretrained("stabilityai/sd-vae-ft-ema"))`;
- `model_index.json`: DiTPipeline's components, and under `_tinyfusion` (a private key, which diffusers
  ignores) the checkpoint's process and codec records and its source file. No `id2label`: DiTPipeline takes it
  optionally (for `get_label_ids`).

What diffusers cannot express is refused in one line: per-block widths (a width-pruned model: diffusers
builds every block at one width), an MLP other than 4x the width, local attention (diffusers' DiT attends
globally), SiT (its transport is no Gaussian schedule; DiTPipeline's schedulers are Gaussian), MAR, and a
model without a null-class embedding (diffusers' class table always has one).

Import reads a diffusers `DiTTransformer2DModel` (a pipeline folder or its `transformer/` folder; the hub's
`Transformer2DModel` configs of facebook/DiT-XL-2-256 included) and writes this toolkit's self-describing
file: the process from the scheduler's config (DiT's default when there is none), the codec from the
pipeline's `vae/` folder (recorded as that folder), else from what `_tinyfusion` names, else unrecorded.

The two implementations differ in one place: diffusers' timestep embedding spaces its frequencies as
exp(-ln(10^4) i / (128 - 1)) (`Timesteps(downscale_freq_shift=1)`) where DiT's uses exp(-ln(10^4) i / 128), which no
weight can undo. The export sets `norm_eps` to DiT's 1e-6 (diffusers' default 1e-5 is in its MLP-side LayerNorm
only), so with `downscale_freq_shift = 0` set in every block's `norm1.emb.time_proj` after loading, an exported
model computes this toolkit's outputs (bitwise, measured on an AMD EPYC); as exported, the outputs differ (the
README's diffusers section: the measured sizes).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn as nn

from models import ARCHITECTURES, build_architecture, total_depth, unwrap
from models.attention import describe_attention
from processes import create_process
from processes.gaussian import GaussianProcess

from .checkpoint import LoadedModel, load_with_flags, save_model
from .errors import UserError, WriteFailed
from .options import DiffusersExportOptions, DiffusersImportOptions
from .paths import check_outputs, file_sha256
from .vae import HUB_VAES, codec_record, is_kl16_spec, resolve_codec

#################################################################################
#                                  The key map                                  #
#################################################################################
# One entry per module: (this toolkit's name, diffusers' name), for each of its tensors ("weight", "bias").
# "{i}" is a block. An entry whose diffusers name has "{i}" and whose toolkit name has none is an embedder that
# diffusers keeps in every block (AdaLayerNormZero's `emb`) and this toolkit once: exported as a copy per block,
# imported only when the copies are equal. A tuple of diffusers names splits the toolkit tensor into equal row
# chunks: the fused qkv projection of DiT (rows q, k, v) into to_q, to_k, to_v.
# Checked against diffusers 0.42: DiTTransformer2DModel's blocks chunk norm1.linear's output into shift, scale,
# gate (attention) and shift, scale, gate (MLP), the order of DiT's adaLN_modulation, and its output layer
# chunks proj_out_1's into shift, scale, as DiT's final layer does; the conditioning of the output layer is
# block 0's embedder.
BLOCK = "transformer_blocks.{i}."
KEY_MAP: tuple[tuple[str, str | tuple[str, ...]], ...] = (
    ("x_embedder.proj", "pos_embed.proj"),
    ("t_embedder.mlp.0", BLOCK + "norm1.emb.timestep_embedder.linear_1"),
    ("t_embedder.mlp.2", BLOCK + "norm1.emb.timestep_embedder.linear_2"),
    ("y_embedder.embedding_table", BLOCK + "norm1.emb.class_embedder.embedding_table"),
    ("blocks.{i}.adaLN_modulation.1", BLOCK + "norm1.linear"),
    ("blocks.{i}.attn.qkv", (BLOCK + "attn1.to_q", BLOCK + "attn1.to_k", BLOCK + "attn1.to_v")),
    ("blocks.{i}.attn.proj", BLOCK + "attn1.to_out.0"),
    ("blocks.{i}.mlp.fc1", BLOCK + "ff.net.0.proj"),
    ("blocks.{i}.mlp.fc2", BLOCK + "ff.net.2"),
    ("final_layer.adaLN_modulation.1", "proj_out_1"),
    ("final_layer.linear", "proj_out_2"),
)
TENSORS = ("weight", "bias")
# Computed, not stored, on both sides: the fixed 2D sin-cos position embedding (this toolkit's `pos_embed` buffer,
# which official files hold; diffusers' non-persistent `pos_embed.pos_embed`). Both compute it from the grid.
COMPUTED = ("pos_embed",)

# The LayerNorm epsilon of every DiT LayerNorm (models/dit.py); diffusers' DiT takes it as `norm_eps` for its
# MLP-side norm (its attention-side and output norms are fixed at 1e-6).
DIT_NORM_EPS = 1e-6
# What diffusers' DiTTransformer2DModel fixes and this toolkit's DiT has: checked on import.
DIFFUSERS_FIXED = {"norm_type": "ada_norm_zero", "activation_fn": "gelu-approximate", "attention_bias": True,
                   "norm_elementwise_affine": False}
# The SD VAEs' latent scale (stabilityai/sd-vae-ft-*, and diffusers' AutoencoderKL default): unit-variance latents
# (LDM, section 4.3.2).
SD_VAE_SCALING_FACTOR = 0.18215
TRANSFORMER_CLASSES = ("DiTTransformer2DModel", "Transformer2DModel")  # the hub's DiT configs say the latter
MLP_RATIO = 4  # diffusers' FeedForward in DiT: 4x the width


def _entries(depth: int):
    """(toolkit key, diffusers key or keys, is a per-block copy) for every tensor name of the map."""
    for ours, theirs in KEY_MAP:
        per_block = "{i}" in (theirs if isinstance(theirs, str) else theirs[0])
        for i in range(depth) if per_block else (None,):
            for tensor in TENSORS:
                ours_key = f"{ours.format(i=i)}.{tensor}"
                theirs_keys = tuple(f"{name.format(i=i)}.{tensor}" for name in
                                    ((theirs,) if isinstance(theirs, str) else theirs))
                yield ours_key, theirs_keys, per_block and "{i}" not in ours


def to_diffusers_state_dict(state_dict: dict[str, torch.Tensor], depth: int) -> dict[str, torch.Tensor]:
    """A DiT state dict (this toolkit's and the official layout) as DiTTransformer2DModel's, through `KEY_MAP`."""
    out, used = {}, set(COMPUTED)
    for ours, theirs, _ in _entries(depth):
        if ours not in state_dict:
            continue  # a module without this tensor (the embedding table has no bias)
        used.add(ours)
        for key, chunk in zip(theirs, state_dict[ours].chunk(len(theirs), dim=0)):
            out[key] = chunk.contiguous() if len(theirs) > 1 else chunk
    unknown = sorted(set(state_dict) - used)
    if unknown:
        raise AssertionError(f"KEY_MAP misses {unknown}")  # models/dit.py changed without the map
    return out


def from_diffusers_state_dict(state_dict: dict[str, torch.Tensor], depth: int, source: str = "the folder"
                              ) -> dict[str, torch.Tensor]:
    """A DiTTransformer2DModel state dict as this toolkit's DiT's (without the computed `pos_embed`).

    Raises:
        UserError: the per-block copies of an embedder differ (this toolkit's DiT has one), or tensors that the map
            does not know (a DiTTransformer2DModel built with options this toolkit's DiT lacks).
    """
    out, used = {}, set()
    for ours, theirs, copied in _entries(depth):
        if theirs[0] not in state_dict:
            continue
        used.update(theirs)
        tensor = torch.cat([state_dict[key] for key in theirs], dim=0) if len(theirs) > 1 else state_dict[theirs[0]]
        if copied and ours in out:
            if not torch.equal(out[ours], tensor):
                block = theirs[0].split(".")[1]
                raise UserError(f"{source}: blocks 0 and {block} hold different {theirs[0].split('.', 2)[2]}: this "
                                 "toolkit's DiT shares one timestep and class embedder across its blocks, so a model "
                                 "whose per-block copies were trained apart cannot be imported")
            continue
        out[ours] = tensor
    unknown = sorted(set(state_dict) - used)
    if unknown:
        raise UserError(f"{source} holds tensors a DiT does not have ({', '.join(unknown[:4])}"
                         f"{' ...' if len(unknown) > 4 else ''}): not a DiT that this toolkit can import")
    return out


#################################################################################
#                          What diffusers can express                           #
#################################################################################

def diffusers_config(model: nn.Module) -> dict:
    """The DiTTransformer2DModel config of a DiT of this toolkit.

    Raises:
        UserError: a model diffusers cannot express, in one line that says why.
    """
    inner = unwrap(model)
    arch = getattr(inner, "arch", type(inner).__name__)
    if arch == "SiT":
        raise UserError("a SiT cannot be exported to diffusers: its process is the flow-matching transport (velocity "
                         "prediction on an interpolant path), and DiTPipeline's schedulers are Gaussian (discrete "
                         "beta schedules of noise-predicting models)")
    if arch == "MAR":
        raise UserError("a MAR cannot be exported to diffusers: it generates masked tokens in an autoregressive "
                         "order with a per-token diffusion head, which no diffusers pipeline or transformer class "
                         "holds (DiTPipeline runs a DiT)")
    if arch != "DiT":
        raise UserError(f"a {arch} cannot be exported to diffusers: only DiT has a diffusers pipeline (DiTPipeline)")
    config = inner.config
    hidden, heads = config["hidden_size"], config["num_heads"]
    attention = config["attention"]
    if attention["kind"] != "global":
        raise UserError(f"a DiT with {describe_attention(attention)} attention cannot be exported to diffusers: "
                         "DiTTransformer2DModel attends globally (every token to every token), so the exported "
                         "model would compute another function than the one its weights were trained for")
    uniform = {"num_heads": heads, "head_dim": hidden // heads, "mlp_hidden": MLP_RATIO * hidden}
    widths = config["block_widths"]
    if any(w != uniform for w in widths):
        differing = sorted({(w["num_heads"], w["mlp_hidden"]) for w in widths})
        raise UserError(f"a DiT whose blocks have their own widths (heads, MLP channels: {differing[:4]}"
                         f"{' ...' if len(differing) > 4 else ''}; width {hidden}) cannot be exported to diffusers: "
                         f"DiTTransformer2DModel builds every block at one width, {heads} heads of {hidden // heads} "
                         f"and an MLP of {MLP_RATIO}x the width ({MLP_RATIO * hidden}); a width-pruned model has no "
                         "diffusers form")
    if config["class_dropout_prob"] <= 0:
        raise UserError("a DiT built without a null-class embedding (class_dropout_prob 0) cannot be exported to "
                         "diffusers: DiTTransformer2DModel's class table always holds the null class")
    return dict(num_attention_heads=heads, attention_head_dim=hidden // heads, in_channels=config["in_channels"],
                out_channels=config["in_channels"] * (2 if config["learn_sigma"] else 1),
                num_layers=total_depth(inner), sample_size=config["input_size"], patch_size=config["patch_size"],
                num_embeds_ada_norm=config["num_classes"], norm_eps=DIT_NORM_EPS, **DIFFUSERS_FIXED)


def to_diffusers(model: nn.Module):
    """diffusers' DiTTransformer2DModel holding the weights of a DiT of this toolkit (eval mode, on the CPU).

    Raises:
        UserError: a model diffusers cannot express (`diffusers_config`).
    """
    from diffusers import DiTTransformer2DModel

    inner = unwrap(model)
    config = diffusers_config(inner)
    state_dict = {k: v.detach().cpu() for k, v in inner.state_dict().items()}
    check_position_embedding(state_dict["pos_embed"], inner)
    weights = to_diffusers_state_dict(state_dict, total_depth(inner))
    with torch.device("meta"):  # no random initialisation of what the weights replace
        transformer = DiTTransformer2DModel(**config)
    # copies: the per-block embedders must not share memory (safetensors refuses shared tensors), nor the model's
    transformer.load_state_dict({k: v.clone() for k, v in weights.items()}, strict=True, assign=True)
    # the position embedding is a computed buffer, not loaded: recompute it on the CPU (the meta device held none)
    transformer.pos_embed.pos_embed = _diffusers_pos_embed(transformer)
    return transformer.eval()


def _diffusers_pos_embed(transformer) -> torch.Tensor:
    from diffusers.models.embeddings import get_2d_sincos_pos_embed

    patch = transformer.pos_embed
    grid = transformer.config.sample_size // transformer.config.patch_size
    return get_2d_sincos_pos_embed(patch.proj.out_channels, grid, base_size=patch.base_size,
                                   interpolation_scale=patch.interpolation_scale,
                                   output_type="pt").float().unsqueeze(0)


def check_position_embedding(pos_embed: torch.Tensor, model: nn.Module) -> None:
    """Refuses a position embedding other than the fixed sin-cos one, which both sides compute rather than load."""
    fresh = _fixed_pos_embed(unwrap(model))
    if pos_embed.shape != fresh.shape or not torch.allclose(pos_embed.float(), fresh, rtol=0, atol=1e-6):
        raise UserError("this DiT's pos_embed is not the fixed 2D sin-cos embedding of its grid (a trained or altered "
                         "position embedding): diffusers computes that embedding and stores none, so it cannot carry "
                         "this one")


def _fixed_pos_embed(model: nn.Module) -> torch.Tensor:
    from models.dit import get_2d_sincos_pos_embed

    tokens, width = model.pos_embed.shape[1:]
    grid = round(tokens ** 0.5)
    return torch.from_numpy(get_2d_sincos_pos_embed(width, grid)).float().unsqueeze(0)


def scheduler_config(process: dict) -> dict:
    """The DDIMScheduler config of a process record: its schedule as diffusers takes it
    (`GaussianProcess.diffusers_schedule`), run as the official DiT's `ddim` sampler (eta 0): no clipping of the
    predicted x_0 (DiT's samplers clip none), the last step to alpha_bar = 1 (`set_alpha_to_one`, as the respaced
    DDIM's alphas_cumprod_prev[0]), timesteps 0, k, 2k, ... (k = steps // N, "leading": the official `ddimN`
    respacing).

    Raises:
        UserError: a process no diffusers scheduler runs (SiT's transport, MAR's masked tokens).
    """
    schedule = getattr(create_process(process), "diffusers_schedule", None)
    if schedule is None:
        raise UserError(f"a model on the {process.get('name')!r} process cannot be exported to diffusers: "
                         "DiTPipeline's schedulers are Gaussian (discrete beta schedules)")
    return dict(**schedule(), clip_sample=False, set_alpha_to_one=True, steps_offset=0, timestep_spacing="leading")


def process_from_scheduler(config: dict, learn_sigma: bool, source: str) -> dict:
    """The process record of a diffusers scheduler config (the inverse of `scheduler_config`).

    Raises:
        UserError: a schedule or prediction that this toolkit's Gaussian process does not have.
    """
    return GaussianProcess.from_diffusers_schedule(config, learn_sigma, source).record()


#################################################################################
#                                    Export                                     #
#################################################################################

def export_pipeline(loaded: LoadedModel, out: str | os.PathLike, vae: str = "auto") -> dict:
    """Writes the diffusers pipeline folder of a loaded DiT (see the module's text); returns its model_index.

    Args:
        loaded: the model and its records (`tinyfusion.checkpoint.load_model`).
        out: the folder; replaced when it holds an earlier export, refused when it holds anything else.
        vae: `--vae`: "auto" (the checkpoint's codec, else DiT's convention by input channels), a local diffusers
            folder (copied), a hub id or ema/mse (named), kl16 or none (no diffusers VAE).
    Raises:
        UserError: a model diffusers cannot express, a --vae folder that is no AutoencoderKL's, or an `out` that holds
            something else.
        WriteFailed: the file system refused; `out` is left as it was.
    """
    diffusers_config(loaded.model)  # the refusals first, before anything is written or imported
    scheduler = scheduler_config(loaded.process)
    spec, why = resolve_codec(vae, loaded.codec, loaded.config["in_channels"])
    if not os.path.isdir(spec) and (os.path.isabs(spec) or spec.startswith(".")):
        raise UserError(f"the VAE folder {spec!r} ({why}) does not exist: pass --vae with the folder, a hub id, or "
                         "none")
    vae_config = _vae_folder_config(spec) if os.path.isdir(spec) else None
    out = Path(out)
    _check_replaceable(out)
    import diffusers

    transformer = to_diffusers(loaded.model)
    # The codec the export stands for: the checkpoint's record when it names this VAE (its scale is the one the
    # model's latents were made with), else what the VAE itself says.
    if loaded.codec is not None and loaded.codec["vae"] == spec:
        codec = dict(loaded.codec)
    elif vae_config is not None:
        codec = codec_record(spec, vae_config.get("scaling_factor", SD_VAE_SCALING_FACTOR))
    elif spec == "none":
        codec = codec_record("none", 1.0)
    elif spec in HUB_VAES:
        codec = codec_record(spec, SD_VAE_SCALING_FACTOR)
    else:
        codec = None  # a hub id or a KL-16 checkpoint whose scale this export cannot read without loading it
    if vae_config is not None:
        named = "vae/ (a copy of the codec's folder)"
    elif spec == "none":
        named = "none: a pixel-space model; pass vae=tinyfusion.diffusers_io.PixelDecoder() to DiTPipeline"
    elif is_kl16_spec(spec):
        named = f"{spec}: MAR's KL-16 autoencoder (tinyfusion.klvae), not a diffusers AutoencoderKL"
    else:
        named = HUB_VAES.get(spec, spec)
    index = {"_class_name": "DiTPipeline", "_diffusers_version": diffusers.__version__,
             "scheduler": ["diffusers", "DDIMScheduler"], "transformer": ["diffusers", "DiTTransformer2DModel"],
             "vae": ["diffusers", "AutoencoderKL"] if vae_config is not None else [None, None],
             "_tinyfusion": {"source": {"path": os.path.abspath(loaded.path), "sha256": file_sha256(loaded.path),
                                        "weights": loaded.weights},
                             "process": loaded.process, "codec": codec, "vae": named, "vae_source": why}}
    tmp = None
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
        transformer.save_pretrained(tmp / "transformer", safe_serialization=True)
        diffusers.DDIMScheduler(**scheduler).save_pretrained(tmp / "scheduler")
        if vae_config is not None:
            shutil.copytree(spec, tmp / "vae")
            if codec["scaling_factor"] != vae_config.get("scaling_factor"):  # DiTPipeline divides by the config's
                (tmp / "vae" / "config.json").write_text(
                    json.dumps({**vae_config, "scaling_factor": codec["scaling_factor"]}, indent=2) + "\n")
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
        os.chmod(tmp, 0o777 & ~_umask())
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException as e:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):
            raise WriteFailed(out, e) from e
        raise
    return index


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _check_replaceable(out: Path) -> None:
    """An export may replace an earlier export, never a folder of something else."""
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return
    index = out / "model_index.json"
    try:
        ours = "_tinyfusion" in json.loads(index.read_text())
    except (OSError, json.JSONDecodeError):
        ours = False
    if not ours:
        raise UserError(f"--out {str(out)!r} exists and is not an earlier export of this toolkit; choose a new "
                         "folder (an export replaces only a folder it wrote)")


def _vae_folder_config(folder: str) -> dict:
    """The config of a diffusers AutoencoderKL folder (what --vae FOLDER must be to be copied)."""
    try:
        config = json.loads((Path(folder) / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        config = {}
    if config.get("_class_name") != "AutoencoderKL":
        raise UserError(f"the VAE folder {folder!r} is not a diffusers AutoencoderKL folder (its config.json names "
                         f"{config.get('_class_name')!r}); give the folder AutoencoderKL.save_pretrained wrote")
    return config


def run_export(args: DiffusersExportOptions) -> dict:
    """`python -m tinyfusion.diffusers_io export`."""
    vae_folder = args.vae if args.vae not in (None, "auto") and os.path.isdir(args.vae) else None
    check_outputs({}, {"--ckpt": args.ckpt, "--vae": vae_folder}, folders={"--out": args.out})
    loaded = load_with_flags(args.ckpt, args)
    index = export_pipeline(loaded, args.out, args.vae)
    record = index["_tinyfusion"]
    print(f"wrote {args.out}: DiTTransformer2DModel of {total_depth(loaded.model)} layers, DDIMScheduler "
          f"({loaded.process['noise_schedule']} betas, {loaded.process['diffusion_steps']} steps)")
    if index["vae"][0] is not None:
        print(f"vae: copied ({record['vae_source']})")
    else:
        print(f"vae: {record['vae']} ({record['vae_source']}); not copied: pass it to DiTPipeline.from_pretrained "
              "(vae=AutoencoderKL.from_pretrained(...)), or export with --vae FOLDER")
    if loaded.config["num_classes"] != 1000:
        print(f"note: DiTPipeline guides with the null label 1000 (ImageNet's); this model has "
              f"{loaded.config['num_classes']} classes (null label {loaded.config['num_classes']}), so run it with "
              "guidance_scale=1")
    return index


#################################################################################
#                                    Import                                     #
#################################################################################

@dataclasses.dataclass
class ImportedModel:
    """A diffusers DiT as this toolkit's: the model, its process and codec records, and where it came from."""

    model: nn.Module
    process: dict
    codec: dict | None
    source: dict


def import_pipeline(folder: str | os.PathLike) -> ImportedModel:
    """Reads a diffusers DiT: a pipeline folder (model_index.json, transformer/, scheduler/, vae/) or a
    DiTTransformer2DModel folder.

    Raises:
        UserError: not such a folder, or a model this toolkit's DiT cannot hold.
    """
    folder = Path(folder)
    root, transformer_dir = _locate(folder)
    index = _read_json(root / "model_index.json") if root is not None else {}
    config = _read_json(transformer_dir / "config.json")
    toolkit_config = _toolkit_config(config, str(transformer_dir))

    from diffusers import DiTTransformer2DModel

    try:
        transformer = DiTTransformer2DModel.from_pretrained(str(transformer_dir), low_cpu_mem_usage=False)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read the transformer in {str(transformer_dir)!r}: {str(e).splitlines()[0]}") from None
    state_dict = transformer.state_dict()
    model = build_architecture("DiT", toolkit_config)
    weights = from_diffusers_state_dict(state_dict, total_depth(model), str(transformer_dir))
    computed = transformer.pos_embed.pos_embed
    if computed.shape != model.pos_embed.shape or not torch.allclose(computed, model.pos_embed, rtol=0, atol=1e-6):
        raise UserError(f"{str(transformer_dir)!r}: diffusers' position embedding differs from DiT's sin-cos "
                         "embedding of the same grid; this toolkit cannot reproduce it")
    model.load_state_dict({**weights, "pos_embed": model.pos_embed}, strict=True)
    model.eval()

    learn_sigma = toolkit_config["learn_sigma"]
    scheduler_path = root / "scheduler" / "scheduler_config.json" if root is not None else None
    record = index.get("_tinyfusion") or {}
    if scheduler_path is not None and scheduler_path.is_file():
        process = process_from_scheduler(_read_json(scheduler_path), learn_sigma, str(scheduler_path))
        recorded = record.get("process") or {}
        # what a scheduler cannot say (training settings of the process) comes from an export's own record
        process = create_process({**process, **{k: recorded[k] for k in ("sigma_small", "use_kl",
                                                                           "rescale_learned_sigmas")
                                                  if k in recorded}}).record()
    else:
        process = create_process(ARCHITECTURES["DiT"].default_process(toolkit_config)).record()
    codec = _imported_codec(root, index, record)
    source = {"folder": os.path.abspath(folder), "transformer": os.path.abspath(transformer_dir),
              "norm_eps": config.get("norm_eps", 1e-5)}
    return ImportedModel(model=model, process=process, codec=codec, source=source)


def _locate(folder: Path) -> tuple[Path | None, Path]:
    """(the pipeline folder or None, the transformer folder) of what --folder names."""
    if (folder / "model_index.json").is_file() and (folder / "transformer" / "config.json").is_file():
        return folder, folder / "transformer"
    if (folder / "config.json").is_file():
        parent = folder.parent
        return (parent if (parent / "model_index.json").is_file() else None), folder
    raise UserError(f"--folder {str(folder)!r} is neither a diffusers pipeline folder (model_index.json and "
                     "transformer/config.json) nor a transformer folder (config.json)")


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read {str(path)!r}: {e}") from None


def _toolkit_config(config: dict, source: str) -> dict:
    """This toolkit's DiT config of a DiTTransformer2DModel config."""
    name = config.get("_class_name")
    if name not in TRANSFORMER_CLASSES:
        raise UserError(f"{source} holds a {name!r}, not a diffusers DiT ({' or '.join(TRANSFORMER_CLASSES)})")
    defaults = {"norm_type": "layer_norm", "activation_fn": "geglu", "attention_bias": False,
                "norm_elementwise_affine": True} if name == "Transformer2DModel" else DIFFUSERS_FIXED
    for key, value in DIFFUSERS_FIXED.items():
        found = config.get(key, defaults[key])
        if found != value:
            raise UserError(f"{source}: {key} is {found!r}; this toolkit's DiT has {value!r} (DiT's adaLN-Zero "
                             "blocks with a tanh-GELU MLP), so it cannot hold this model")
    if config.get("num_embeds_ada_norm") is None or config.get("patch_size") is None:
        raise UserError(f"{source}: a transformer without patches and class embeddings (num_embeds_ada_norm, "
                         "patch_size) is no DiT")
    heads, head_dim = int(config.get("num_attention_heads", 16)), int(config.get("attention_head_dim", 72))
    in_channels = int(config.get("in_channels", 4))
    out_channels = int(config.get("out_channels") or in_channels)
    if out_channels not in (in_channels, 2 * in_channels):
        raise UserError(f"{source}: {out_channels} output channels for {in_channels} input channels; a DiT outputs "
                         "the noise, or the noise and the variance (twice the input channels)")
    return dict(input_size=int(config.get("sample_size", 32)), patch_size=int(config["patch_size"]),
                in_channels=in_channels, hidden_size=heads * head_dim, depth=int(config.get("num_layers", 28)),
                num_heads=heads, mlp_ratio=float(MLP_RATIO), class_dropout_prob=0.1,
                num_classes=int(config["num_embeds_ada_norm"]), learn_sigma=out_channels == 2 * in_channels,
                attention={"kind": "global"})


def _imported_codec(root: Path | None, index: dict, record: dict) -> dict | None:
    """The pipeline's vae folder when it has one; else the codec an export of ours recorded; else unknown."""
    if root is not None and index.get("vae", [None])[0] is not None and (root / "vae" / "config.json").is_file():
        scaling_factor = _read_json(root / "vae" / "config.json").get("scaling_factor", SD_VAE_SCALING_FACTOR)
        return {"vae": os.path.abspath(root / "vae"), "scaling_factor": float(scaling_factor)}
    return record.get("codec")


def run_import(args: DiffusersImportOptions) -> ImportedModel:
    """`python -m tinyfusion.diffusers_io import`."""
    check_outputs({"--save-model": args.save_model}, {"--folder": args.folder})
    imported = import_pipeline(args.folder)
    save_model(args.save_model, imported.model, process=imported.process, codec=imported.codec,
               extra={"imported_from": imported.source})
    config = imported.model.config
    print(f"wrote {args.save_model}: DiT of {total_depth(imported.model)} blocks, width {config['hidden_size']}, "
          f"{config['num_heads']} heads, {imported.process['noise_schedule']} Gaussian process, codec "
          f"{(imported.codec or {}).get('vae', 'unrecorded')}")
    if imported.source["norm_eps"] != DIT_NORM_EPS:
        print(f"note: the diffusers model's MLP-side LayerNorm used eps {imported.source['norm_eps']:g}; this "
              f"toolkit's DiT uses {DIT_NORM_EPS:g} (DiT's), a difference of the order of the rounding")
    return imported


#################################################################################
#                          diffusers' DiT behind our call                       #
#################################################################################

def dit_frequencies(transformer, shift: float = 0.0) -> None:
    """Sets the frequency spacing of diffusers' timestep embedding in every block of a DiTTransformer2DModel:
    0 is DiT's (10^4^(-i/128)), with which an export computes this toolkit's outputs; 1 is diffusers' default."""
    for block in transformer.transformer_blocks:
        block.norm1.emb.time_proj.downscale_freq_shift = shift


class PixelDecoder(nn.Module):
    """The "VAE" of a pixel-space export: DiTPipeline divides its latents by `config.scaling_factor` and returns
    `decode(latents).sample` mapped from [-1, 1]; here the latents are the images.
    `DiTPipeline.from_pretrained(FOLDER, vae=PixelDecoder())`."""

    def __init__(self):
        super().__init__()
        self.config = SimpleNamespace(scaling_factor=1.0)
        # a pipeline places and reads its components by their `device` and `dtype`, which this one takes from a
        # buffer it moves with
        self.register_buffer("anchor", torch.zeros(()), persistent=False)

    @property
    def device(self) -> torch.device:
        return self.anchor.device

    @property
    def dtype(self) -> torch.dtype:
        return self.anchor.dtype

    def decode(self, latents: torch.Tensor, return_dict: bool = True):
        return SimpleNamespace(sample=latents) if return_dict else (latents,)


class DiffusersDiT(nn.Module):
    """diffusers' DiTTransformer2DModel behind this toolkit's call, model(x_t, t, y), with what the benchmarks read
    of a model: `data_shape`, `num_classes` and its blocks as one stack (`total_depth`)."""

    stacks = {"blocks": ("blocks", None, None)}
    # The inference path (models/inference.py), on the same layers as DiT's: each block's attention and feed-forward
    # linears; the adaLN-Zero norms (with the embedders diffusers copies into them) and the output layers stay float32.
    low_precision_modules = ("transformer.transformer_blocks.*.attn1", "transformer.transformer_blocks.*.ff")

    def __init__(self, transformer):
        super().__init__()
        self.transformer = transformer
        config = transformer.config
        self.data_shape = (config.in_channels, config.sample_size, config.sample_size)
        self.num_classes = config.num_embeds_ada_norm

    @property
    def blocks(self) -> nn.ModuleList:
        return self.transformer.transformer_blocks

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.transformer(x, timestep=t, class_labels=y).sample  # (N, C_out, H, W)


#################################################################################
#                                 Command line                                  #
#################################################################################

def parse_args(argv=None):
    from .args import diffusers_io_parser

    return diffusers_io_parser(__doc__).parse_args(argv)


def main(args) -> None:
    from .args import to_options

    command = vars(args).pop("command")
    if command == "export":
        run_export(to_options(DiffusersExportOptions, args))
    else:
        run_import(to_options(DiffusersImportOptions, args))


__all__ = ["COMPUTED", "DiffusersDiT", "ImportedModel", "KEY_MAP", "diffusers_config", "export_pipeline",
           "from_diffusers_state_dict", "import_pipeline", "process_from_scheduler", "run_export", "run_import",
           "scheduler_config", "to_diffusers", "to_diffusers_state_dict"]


if __name__ == "__main__":
    from .cli import run_script

    run_script(main, parse_args)
