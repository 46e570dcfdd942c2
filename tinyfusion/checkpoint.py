"""One safe loader for every checkpoint a user holds, and self-describing files for what we write.

Read (always with `weights_only=True`; a pickle that would run code is refused):
- official DiT releases: a plain state dict (`DiT-XL-2-256x256.pt`);
- training checkpoints of DiT and TinyFusion: {"model", "ema", "opt", "args"}, where "args" is an
  argparse.Namespace (the one class allowed beyond tensors and plain containers);
- official MAR checkpoints (`checkpoint-last.pth`): {"model", "model_ema", "optimizer", "epoch", "args"};
- TinyFusion's pruned files: a plain state dict of the shallow model, possibly with its gate
  tensors beside the weights;
- safetensors files;
- our own files (below).

Our files record the architecture and constructor arguments beside the weights, and for pruned
models their lineage (which original block each block came from, and the source file), so any
script rebuilds the model from the file alone. Writes are atomic: a temporary file, then rename.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import json
import os
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from models import (
    ARCHITECTURES,
    MODELS,
    OFFICIAL_NAMES,
    GatedModel,
    build_architecture,
    compose_kept_indices,
    compose_kept_units,
    registry_spec,
    total_depth,
    unwrap,
)
from models.attention import NO_ATTENTION_KINDS, attention_spec, describe_attention
from processes import create_process

from .errors import AmbiguousWeights, RunFailed, UserError
from .fileio import atomic_write
from .options import ModelOptions
from .paths import file_sha256

FORMAT = "tinyfusion-toolkit"
# 2: the record holds "process" and "codec" and a complete config (per-block widths, attention kind);
# files of version 1 still load (their process is the family's default and their codec unrecorded). A file of a
# newer version is refused (check_version): this code cannot know what it would misread.
FORMAT_VERSION = 2
SAFETENSORS_METADATA_KEY = "tinyfusion"
# A .safetensors file holds one weight set (the EMA when there is one), stored as "model"; its record says which.
SAFETENSORS_WEIGHTS_KEY = "weights"
# Every file the toolkit writes carries the SHA-256 of its content (tensors bit for bit, and every other
# value), checked when it is read: a flipped byte, from a failing disk or a bad copy, is an error.
INTEGRITY_KEY = "integrity"
INTEGRITY_SCHEME = "tinyfusion-content-sha256-v1"

# Prefixes that wrappers add to parameter names: DDP, torch.compile.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
# Tensors that TinyFusion's gated training stored beside the weights; they are not model weights.
_GATE_KEY = re.compile(r"^(gumbel_gates|options)(\.|$)")


@dataclasses.dataclass
class LoadedModel:
    """A model rebuilt from a file, with what the file says about it.

    Attributes:
        model: the model, on CPU, in eval mode, weights loaded.
        arch: architecture name, the model's family (a key of models.ARCHITECTURES).
        config: the constructor's keyword arguments.
        process: the noise process's record (processes.create_process rebuilds it).
        codec: the codec's record ({"vae": spec, "scaling_factor": s}, "vae" "none" for pixels), or None
            when the file does not say (official weights, older files).
        lineage: for pruned models, {"kept_indices": original block of each block, "source_depth",
            "source": {"path", "sha256"}, "method", "parent"}, and for narrowed ones "kept_heads" and
            "kept_channels" (the original heads and MLP channels of each block) and "width" (how they were
            chosen); None for unpruned models.
        weights: which weights were read: "ema", "model" or "plain".
        path: the file.
        extra: anything else the file recorded (settings, decisions).
    """

    model: nn.Module
    arch: str
    config: dict
    process: dict
    codec: dict | None
    lineage: dict | None
    weights: str
    path: str
    extra: dict


#################################################################################
#                                  Reading files                                #
#################################################################################

def read_checkpoint(path: str | os.PathLike) -> dict:
    """Reads a .pt/.pth/.bin (pickle, safely) or .safetensors file into a dict, verifying its content hash.

    Raises:
        UserError: the file is missing, not a checkpoint (an HTML page, an image, a truncated or empty
            file: said so), corrupted (its content differs from the hash written with it), not a dict,
            or holds objects that unpickling would have to run code for.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {str(path)!r} does not exist; check the path "
                         f"(official DiT weights: https://dl.fbaipublicfiles.com/DiT/models/DiT-XL-2-256x256.pt)")
    what = sniff_file(path)
    if what is not None:
        raise UserError(f"{str(path)!r} is not a checkpoint: it is {what}")
    if path.suffix == ".safetensors":
        obj = _read_safetensors(path)
    else:
        obj = _read_pickle(path)
    check_version(obj, path)
    verify_integrity(obj, path)
    if path.suffix == ".safetensors" and is_self_describing(obj):
        held = obj.pop(SAFETENSORS_WEIGHTS_KEY, "model")  # files written before it was recorded: "model"
        if held not in ("ema", "model"):
            raise UserError(f"{str(path)!r}: its record says it holds {held!r} weights, which this toolkit does not "
                             "know ('ema' or 'model'); re-export it with tinyfusion.checkpoint.save_model")
        obj[held] = obj.pop("model")
    return obj


def check_version(obj: dict, path: str | os.PathLike) -> None:
    """Refuses a toolkit file of a format version newer than this code reads (rather than half-loading it)."""
    if not is_self_describing(obj):
        return
    version = obj.get("version", 1)
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise UserError(f"{str(path)!r} records format version {version!r}, which is no version of the {FORMAT} "
                         f"format (this toolkit reads versions 1 to {FORMAT_VERSION}); the file is damaged: "
                         "re-create it, or restore it from a good copy")
    if version > FORMAT_VERSION:
        raise UserError(f"{str(path)!r} is of format version {version}, newer than this toolkit reads (versions up to "
                         f"{FORMAT_VERSION}): upgrade the toolkit to load it")


def _read_pickle(path: Path) -> dict:
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights only load failed" in str(e).lower() and ("unsupported global" in str(e).lower()
                                                             or "global" in _first_line(e).lower()):
            raise UserError(
                f"refusing to load {str(path)!r}: it holds pickled Python objects beyond tensors and plain "
                f"containers, which could run code when loaded ({_unsupported_global(e)}). Load it only if you "
                "trust it, re-save its state_dict() alone, and pass that file instead") from None
        raise UserError(f"{str(path)!r} is not a PyTorch checkpoint ({_first_line(e)}); check that it is the "
                         "file you meant, complete and uncorrupted") from None
    except (RuntimeError, EOFError, OSError) as e:
        raise UserError(f"cannot read checkpoint {str(path)!r}: {_first_line(e)}. Is the file complete "
                         "(not truncated by an interrupted download or copy)?") from None
    if not isinstance(obj, dict):
        raise UserError(f"checkpoint {str(path)!r} holds a {type(obj).__name__}, not a dict of weights")
    return obj


def _unsupported_global(e: BaseException) -> str:
    found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e))
    return f"it needs {found.group(1)}" if found else _first_line(e)


def sniff_file(path: Path) -> str | None:
    """What a file named as a checkpoint really is, when it is plainly something else; None otherwise.

    Recognised: an empty file, an HTML page (a download that returned a login or error page), PNG,
    JPEG and GIF images, a truncated zip (an interrupted download or copy of a .pt), gzip, NumPy and
    JSON files, and a safetensors file under another extension.
    """
    size = path.stat().st_size
    if size == 0:
        return "an empty file (an interrupted download or copy?); fetch it again"
    with open(path, "rb") as f:
        head = f.read(1024)
    text = head.lstrip().lower()
    if text.startswith((b"<!doctype html", b"<html", b"<head", b"<?xml")) or b"<html" in text[:512]:
        return ("an HTML page (a download that returned a web page, such as a login or error page, instead of "
                "the file); download the file itself")
    for magic, kind in ((b"\x89PNG\r\n\x1a\n", "a PNG image"), (b"\xff\xd8\xff", "a JPEG image"),
                        (b"GIF8", "a GIF image"), (b"\x1f\x8b", "a gzip archive; decompress it first"),
                        (b"\x93NUMPY", "a NumPy array file (.npy)")):
        if head.startswith(magic):
            return kind + ("" if "first" in kind else "; give the checkpoint file")
    if head.startswith(b"PK\x03\x04") and path.suffix != ".safetensors":
        if not zipfile.is_zipfile(path):
            return (f"a truncated zip archive ({size:,} bytes; a PyTorch checkpoint ends with a zip directory this "
                    "file lacks): an interrupted download or copy; fetch it again")
        return None
    if text.startswith((b"{", b"[")) and path.suffix != ".safetensors":
        return "a JSON or text file; give the checkpoint file"
    if path.suffix != ".safetensors" and len(head) >= 10 and head[8:10] == b'{"' \
            and int.from_bytes(head[:8], "little") < size:
        return "a safetensors file under another name; rename it to end in .safetensors"
    if path.suffix == ".safetensors" and (len(head) < 8 or int.from_bytes(head[:8], "little") + 8 > size):
        return "a truncated or invalid safetensors file (its header is longer than the file); fetch it again"
    return None


def _read_safetensors(path: Path) -> dict:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
            metadata = f.metadata() or {}
    except (SafetensorError, OSError) as e:
        raise UserError(f"cannot read safetensors file {str(path)!r}: {e}") from None
    if SAFETENSORS_METADATA_KEY not in metadata:
        return tensors
    try:
        record = json.loads(metadata[SAFETENSORS_METADATA_KEY])
    except json.JSONDecodeError as e:
        raise UserError(f"{str(path)!r}: its {SAFETENSORS_METADATA_KEY!r} metadata is not valid JSON ({e}); the file "
                         "is damaged or was not written by this toolkit; re-export it with save_model") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT or "arch" not in record \
            or "config" not in record:
        raise UserError(f"{str(path)!r}: its {SAFETENSORS_METADATA_KEY!r} metadata does not describe a model "
                         f"(expected a {FORMAT} record with 'arch' and 'config'); re-export it with save_model, or "
                         "strip the metadata and pass --model")
    record["model"] = tensors
    return record


def _first_line(e: BaseException) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def is_self_describing(obj: dict) -> bool:
    return obj.get("format") == FORMAT


def select_state_dict(obj: dict, weights: str = "ema", path: str = "checkpoint") -> tuple[dict, str]:
    """The model weights of a checkpoint dict, wrapper prefixes stripped.

    Args:
        obj: what `read_checkpoint` returned.
        weights: "ema" (preferred when present, else "model") or "model".
        path: the file's name, for messages.
    Returns:
        (state dict, which): which is "ema", "model" or "plain".
    """
    if weights not in ("ema", "model"):
        raise UserError(f"weights must be 'ema' or 'model', got {weights!r}")
    if "model" in obj or "ema" in obj or "model_ema" in obj:
        ema = obj.get("ema") if obj.get("ema") is not None else obj.get("model_ema")  # MAR names it model_ema
        which = "ema" if weights == "ema" and ema is not None else "model"
        state_dict = ema if which == "ema" else obj.get("model")
        if state_dict is None:
            if which == "model" and ema is not None:
                raise UserError(f"{path} holds only the EMA weights, not the raw model's (a .safetensors file written "
                                 "by save_model keeps one set: the EMA when there is one): load them with --weights "
                                 "ema (weights='ema'), or use the .pt file of the run, which holds both")
            present = sorted(k for k in obj if obj[k] is not None)
            raise UserError(f"{path} has no {which!r} weights; it holds {present}")
    elif "state_dict" in obj and isinstance(obj["state_dict"], dict):
        which, state_dict = "model", obj["state_dict"]
    else:
        which, state_dict = "plain", obj
    if not state_dict or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise UserError(f"{path} does not hold a state dict of tensors under {which!r}")
    return strip_prefixes(state_dict), which


def strip_prefixes(state_dict: dict) -> dict:
    """Removes `module.` (DDP) and `_orig_mod.` (torch.compile) from parameter names."""
    out = {}
    for key, value in state_dict.items():
        changed = True
        while changed:
            changed = False
            for prefix in _WRAPPER_PREFIXES:
                if key.startswith(prefix):
                    key, changed = key[len(prefix):], True
            key = key.replace("._orig_mod.", ".")
        out[key] = value
    return out


#################################################################################
#                                   Integrity                                   #
#################################################################################

def content_digest(obj: Any) -> str:
    """The SHA-256 of a checkpoint's content: every tensor's dtype, shape and bytes, and every other value,
    walked in a fixed order (dict keys sorted), so the same content always gives the same digest."""
    digest = hashlib.sha256()
    _feed(digest, obj)
    return digest.hexdigest()


def _feed(digest, obj: Any) -> None:
    if isinstance(obj, torch.Tensor):
        tensor = obj.detach().cpu().contiguous()
        digest.update(f"T{tensor.dtype}{tuple(tensor.shape)};".encode())
        if tensor.numel():
            digest.update(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))
    elif isinstance(obj, dict):
        digest.update(f"D{len(obj)};".encode())
        for key in sorted(obj, key=repr):
            _feed(digest, key)
            _feed(digest, obj[key])
    elif isinstance(obj, (list, tuple)):
        digest.update(f"{'L' if isinstance(obj, list) else 'U'}{len(obj)};".encode())
        for item in obj:
            _feed(digest, item)
    elif isinstance(obj, argparse.Namespace):
        digest.update(b"N")
        _feed(digest, vars(obj))
    elif obj is None or isinstance(obj, (str, int, float, bool, bytes)):
        digest.update(f"{type(obj).__name__}:{obj!r};".encode())
    else:
        raise TypeError(f"cannot hash a {type(obj).__name__} in a checkpoint")


def with_integrity(obj: dict) -> dict:
    """`obj` with its content digest added (what every toolkit writer stores)."""
    body = {k: v for k, v in obj.items() if k != INTEGRITY_KEY}
    return {**body, INTEGRITY_KEY: {"scheme": INTEGRITY_SCHEME, "sha256": content_digest(body)}}


def verify_integrity(obj: dict, path: str | os.PathLike) -> None:
    """Checks (and removes) the digest a toolkit file carries; files without one (official weights) pass."""
    record = obj.pop(INTEGRITY_KEY, None)
    if record is None:
        return
    if not isinstance(record, dict) or record.get("scheme") != INTEGRITY_SCHEME:
        raise UserError(f"{str(path)!r} carries an integrity record of an unknown scheme ({record!r}); it was "
                         "written by a newer toolkit: update this one")
    if content_digest(obj) != record.get("sha256"):
        raise UserError(f"{str(path)!r} is corrupted: its content differs from the SHA-256 written with it (a "
                         "failing disk, or a damaged copy); restore it from a good copy, or re-create it (if you "
                         f"edited it on purpose, delete its {INTEGRITY_KEY!r} entry, or write it with "
                         "tinyfusion.checkpoint.save_model)")


def first_nonfinite(state_dicts: dict[str, dict]) -> str | None:
    """The first floating tensor with a NaN or an infinity, as "which/name"; None when all are finite.

    Args:
        state_dicts: name (e.g. "model", "ema") -> state dict.
    """
    for which, state_dict in state_dicts.items():
        for name, tensor in (state_dict or {}).items():
            if torch.is_tensor(tensor) and tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                return f"{which}/{name}"
    return None


def check_finite(record: dict, path: str | os.PathLike) -> None:
    """Refuses to write a model whose weights hold NaN or infinities (RunFailed, naming the tensor)."""
    bad = first_nonfinite({k: record.get(k) for k in ("model", "ema") if isinstance(record.get(k), dict)})
    if bad is not None:
        raise RunFailed(f"not writing {str(path)!r}: its weights are not finite ({bad} holds NaN or inf), so the "
                        "training diverged; lower --lr (or use --precision bf16/fp32 instead of fp16) and re-run")


#################################################################################
#                            Architecture of a state dict                       #
#################################################################################

def family_config(state_dict: dict, arch: str | None, num_heads: int | None = None, path: str = "the file"
                  ) -> tuple[str, dict]:
    """(family, constructor arguments) of a bare state dict in an official layout.

    The family comes from `arch` (from --model); without it, from the one registered family whose
    layout the weights fit. When several fit (SiT's layout is DiT's), the family is never guessed.
    """
    if arch is not None:
        try:
            return arch, ARCHITECTURES[arch].config_from_state_dict(state_dict, num_heads)
        except AmbiguousWeights:
            raise
        except UserError as e:
            raise UserError(f"--model names a {arch}, but {path} does not hold one ({e}); pass the --model of the "
                             "family the file holds") from None
    fits, errors = {}, []
    for name, cls in ARCHITECTURES.items():
        try:
            fits[name] = cls.config_from_state_dict(state_dict, num_heads)
        except AmbiguousWeights:
            raise  # the layout is this family's, but the weights cannot rebuild the model
        except UserError as e:
            errors.append(str(e))
    if len(fits) == 1:
        return next(iter(fits.items()))
    if len(fits) > 1:
        raise UserError(f"{path} is a bare state dict whose layout fits several families ({', '.join(fits)}): "
                         f"name the family and size with --model (e.g. --model {next(iter(fits))}-XL/2)")
    raise UserError(f"{path} holds no model of a known family: {'; '.join(dict.fromkeys(errors))}")


def config_differences(expected: dict, found: dict) -> list[str]:
    """Fields of `expected` whose value differs in `found`, as readable lines."""
    return [f"{k}: the model name says {expected[k]!r}, the checkpoint has {found.get(k)!r}"
            for k in expected if found.get(k) != expected[k]]


#################################################################################
#                                  Loading models                               #
#################################################################################

def load_model(path: str | os.PathLike, model_name: str | None = None, *, weights: str = "ema",
               num_heads: int | None = None, groups: str | None = None, attention: dict | None = None) -> LoadedModel:
    """Rebuilds a model from any checkpoint a user holds.

    Args:
        path: the file.
        model_name: optional registry name; it must agree with the file (a clear error lists the
            fields that differ). Needed only for a plain state dict of a non-official width
            (else give num_heads). A gated name (e.g. DiT-XL-1-2) wraps the loaded model in its gates.
        weights: "ema" (preferred when present) or "model".
        num_heads: head count for plain state dicts of non-official widths.
        groups: N:M groups to wrap the model in (overrides a gated name's preset).
        attention: the attention kind the user states (`--attention`): a bare state dict cannot say it and loads as
            global without it; a file of ours records its kind, and a stated kind that differs is refused (a local
            model never reloads as global; converting is what training does, `convert_attention`).
    Returns:
        a LoadedModel (the model on CPU, eval mode).
    """
    path = str(path)
    obj = read_checkpoint(path)
    if obj.get("kind") == "pruning":
        raise UserError(f"{path} is a prune_by_learning checkpoint (gates and temporary weight updates), not a "
                         "model: use the pruned model that prune_by_learning.py writes to --save-model (re-run "
                         "its command to finish the run)")
    state_dict, which = select_state_dict(obj, weights, path)
    ignored = sorted(k for k in state_dict if _GATE_KEY.match(k))
    state_dict = {k: v for k, v in state_dict.items() if k not in ignored}

    trained_as = getattr(obj.get("args"), "model", None) if isinstance(obj.get("args"), argparse.Namespace) else None
    trained_as = OFFICIAL_NAMES.get(trained_as, trained_as)  # the official MAR code says mar_large
    if model_name is None and not is_self_describing(obj) and trained_as in MODELS:
        # A DiT / SiT / MAR / TinyFusion training checkpoint names its model: its family decides (sizes: the
        # weights).
        model_name = registry_spec(trained_as)[0]
    arch_of_name, fixed, preset_groups = registry_spec(model_name) if model_name else (None, {}, None)
    if is_self_describing(obj):
        arch, config = obj["arch"], dict(obj["config"])
        if arch_of_name is not None and arch_of_name != arch and not _same_layout(arch, arch_of_name):
            raise UserError(f"--model {model_name} is a {arch_of_name}, but {path} holds a {arch}; drop --model to "
                             "use the model the file describes")
        if arch_of_name is not None:
            arch = arch_of_name  # e.g. a DiT file given --model SiT-XL/2: the layouts are equal
    else:
        arch, config = family_config(state_dict, arch_of_name, num_heads or fixed.get("num_heads"), path)
    if attention is not None:
        config = with_stated_attention(config, attention, arch, path, recorded=is_self_describing(obj))
    differences = config_differences(fixed, config)
    if differences:
        raise UserError(f"--model {model_name} does not match {path}:\n  " + "\n  ".join(differences)
                         + "\nDrop --model to use the architecture the file describes, or pass the matching name.")
    if arch not in ARCHITECTURES:
        raise UserError(f"{path} holds a model of the family {arch!r}, which this toolkit does not know; known: "
                         f"{', '.join(ARCHITECTURES)}")
    family = ARCHITECTURES[arch]
    recorded_process = obj.get("process") if is_self_describing(obj) and obj.get("arch") == arch else None
    if recorded_process:
        process = create_process(recorded_process).record()
        # A family's constructor arguments that are settings of its process come from the process record, their
        # one source (an older file's config may carry them too: the record wins).
        model = build_architecture(arch, {**config, **process_arguments(family, process)})
    else:
        # The family's default process for the complete config (and what an older file's config carries).
        model = build_architecture(arch, config)
        process = create_process(family.default_process({**config, **model.config})).record()
    config = dict(model.config)  # complete: per-block widths and attention filled in for older files
    _load_weights(model, state_dict, path)
    model.eval()
    groups = groups or preset_groups
    if groups is not None:
        model = GatedModel(model, groups)
    extra = dict(obj.get("extra") or {}) if is_self_describing(obj) else {}
    if ignored:
        extra["ignored_keys"] = ignored
    if not is_self_describing(obj) and isinstance(obj.get("args"), argparse.Namespace):
        extra["args"] = vars(obj["args"])
    return LoadedModel(model=model, arch=arch, config=config, process=process,
                       codec=obj.get("codec") if is_self_describing(obj) else None,
                       lineage=obj.get("lineage") if is_self_describing(obj) else None,
                       weights=which, path=path, extra=extra)


def load_with_flags(path: str | os.PathLike, args: ModelOptions) -> LoadedModel:
    """`load_model` with a script's model flags: --model, --weights, --num-heads and --attention."""
    return load_model(path, args.model, weights=args.weights, num_heads=args.num_heads,
                      attention=args.stated_attention())


def with_stated_attention(config: dict, attention: dict, arch: str, path: str, *, recorded: bool) -> dict:
    """`config` with the attention kind `--attention` states: what a bare state dict needs, and what a file of ours
    must agree with."""
    if "attention" not in config:
        raise UserError(f"--attention: {path} holds a {arch}, which has no attention kinds ({NO_ATTENTION_KINDS}); "
                         "drop --attention")
    if recorded:
        found = attention_spec(config["attention"])
        if found != attention:
            if attention["kind"] == "global":  # its attention weights were distilled for its window
                how = "a local model does not reload as global"
            else:
                how = ("to convert a model to local attention or another radius, distil it with train_masked_kd.py "
                       "--attention local --attention-radius R")
            raise UserError(f"--attention says {describe_attention(attention)} but {path} records "
                             f"{describe_attention(found)} attention: drop --attention (the file describes its model); "
                             + how)
        return config
    return {**config, "attention": attention}


def process_arguments(family: type[nn.Module], process: dict) -> dict:
    """The constructor arguments of `family` that its process record holds (the family's `process_arguments`,
    e.g. MAR's num_sampling_steps), with the record's values."""
    return {key: process[key] for key in getattr(family, "process_arguments", ()) if key in process}


def _same_layout(arch_a: str, arch_b: str) -> bool:
    """Whether two families share one parameter layout (a file of one loads as the other)."""
    a, b = ARCHITECTURES.get(arch_a), ARCHITECTURES.get(arch_b)
    return a is not None and b is not None and (issubclass(a, b) or issubclass(b, a))


def _load_weights(model: nn.Module, state_dict: dict, path: str) -> None:
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    mismatched = [f"{k}: file {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
                  for k in own if k in state_dict and state_dict[k].shape != own[k].shape]
    if missing or unexpected or mismatched:
        lines = []
        for title, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", mismatched)):
            if keys:
                lines.append(f"{title} ({len(keys)}): {', '.join(keys[:6])}{' ...' if len(keys) > 6 else ''}")
        raise UserError(f"the weights in {path} do not fit the model:\n  " + "\n  ".join(lines))
    model.load_state_dict(state_dict, strict=True)


#################################################################################
#                                  Writing files                                #
#################################################################################

def atomic_save(obj: dict, path: str | os.PathLike) -> None:
    """torch.save of `obj` with its content digest, to a temporary file in the same folder, then an atomic
    rename over `path`. Model weights (`model`, `ema`) must be finite."""
    check_finite(obj, path)
    obj = with_integrity(obj)
    atomic_write(path, lambda f: torch.save(obj, f))


def model_record(model: nn.Module, *, process: dict | None = None, codec: dict | None = None,
                 ema: nn.Module | None = None, lineage: dict | None = None, extra: dict | None = None) -> dict:
    """The self-describing dict of a model: format, family, complete config, process, codec, weights, lineage.

    `process` defaults to the family's default process for this config; `codec` None records that the
    codec is unknown (samplers then apply DiT's convention, see tinyfusion.vae.resolve_codec).
    """
    inner = unwrap(model)
    if process is None:
        process = create_process(type(inner).default_process(inner.config)).record()
    record = {
        "format": FORMAT, "version": FORMAT_VERSION, "arch": inner.arch, "config": dict(inner.config),
        "process": dict(process), "codec": dict(codec) if codec is not None else None,
        "model": {k: v.detach().cpu() for k, v in inner.state_dict().items()},
        "lineage": lineage, "extra": extra or {},
    }
    if ema is not None:
        record["ema"] = {k: v.detach().cpu() for k, v in unwrap(ema).state_dict().items()}
    return record


def save_model(path: str | os.PathLike, model: nn.Module, *, process: dict | None = None, codec: dict | None = None,
               ema: nn.Module | None = None, lineage: dict | None = None, extra: dict | None = None) -> None:
    """Writes a self-describing model file (.pt, or .safetensors with the description as metadata)."""
    record = model_record(model, process=process, codec=codec, ema=ema, lineage=lineage, extra=extra)
    if str(path).endswith(".safetensors"):
        from safetensors.torch import save

        check_finite(record, path)
        held = "ema" if record.get("ema") is not None else "model"
        weights = record.pop(held)
        record.pop("model", None)
        # The tensors are stored as "model" (readers of files before the set was recorded read them so); the record
        # says which set they are.
        record = with_integrity({**record, SAFETENSORS_WEIGHTS_KEY: held, "model": weights})
        record.pop("model")
        data = save({k: v.contiguous() for k, v in weights.items()},
                    metadata={SAFETENSORS_METADATA_KEY: json.dumps(record)})
        atomic_write(path, lambda f: f.write(data))
    else:
        atomic_save(record, path)


def pruned_lineage(source: LoadedModel, kept_indices: list[int], method: str, width: dict | None = None) -> dict:
    """The lineage of a model made of `kept_indices` of `source` (composed if `source` was pruned), narrowed by
    `width` when given ({"kept_heads", "kept_channels"}: per kept block, indices into its heads and channels, and
    how they were chosen: "criterion", "ratio", "global").

    Once a model is narrowed, its lineage says for every block which heads ("kept_heads") and MLP channels
    ("kept_channels") of the original block it kept, and how ("width"); later pruning carries them on.
    """
    source_lineage = source.lineage or {}
    original = compose_kept_indices(source_lineage.get("kept_indices"), kept_indices)
    lineage = {
        "kept_indices": original,
        "source_depth": source_lineage.get("source_depth", total_depth(source.model)),
        "source": {"path": os.path.abspath(source.path), "sha256": file_sha256(source.path)},
        "method": method,
        "parent": copy.deepcopy(source.lineage),
    }
    units = {key: [source_lineage[key][i] for i in kept_indices] if source_lineage.get(key) is not None else None
             for key in ("kept_heads", "kept_channels")}
    if width is not None:
        units = {key: compose_kept_units(units[key], width[key]) for key in units}
        lineage["width"] = {k: v for k, v in width.items() if k not in units}
    elif source_lineage.get("width") is not None:
        lineage["width"] = copy.deepcopy(source_lineage["width"])
    if units["kept_heads"] is not None:
        lineage.update(units)
    return lineage


__all__ = [
    "FORMAT", "LoadedModel", "atomic_save", "check_finite", "config_differences", "content_digest",
    "family_config", "file_sha256", "first_nonfinite", "is_self_describing", "sniff_file", "verify_integrity",
    "with_integrity", "load_model", "model_record", "pruned_lineage",
    "read_checkpoint", "save_model", "select_state_dict", "strip_prefixes",
]
