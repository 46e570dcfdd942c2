"""Masked Knowledge Distillation (TinyFusion, section 3.3): recovering a pruned model from its teacher.

    loss = alpha * KD + (1 - alpha) * GT + beta * FEAT

KD is the distance between the student's and the teacher's predictions, as the noise process
defines it (DiT: MSE on the noise, plus with learned variances the KL divergence between their
Gaussians p(x_{t-1} | x_t)); GT is the process's training loss; FEAT is the MSE between hidden
states of mapped blocks (flat indices over the block stacks), where
positions holding massive activations (|h - mean| > k * std of their tensor, in the teacher or
the student) are masked out: those few huge values would otherwise dominate the loss and
destabilise the student. beta decays linearly to 0 over the run.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from models import BlockRecorder, flat_blocks, total_depth, unwrap
from models import layer_map as lineage_layer_map
from models.attention import describe_attention
from processes import NoiseProcess, create_process

from .checkpoint import LoadedModel, load_model
from .clear import ClearTask, train_only_attention
from .engine import Batch, Task
from .errors import UserError
from .options import MaskedKDOptions
from .training import (
    model_for_training,
    parameter_count,
    predict_with_teacher,
    set_grad_checkpointing,
    start_run,
    total_steps,
    train_and_save,
    with_family_recipe,
)

#################################################################################
#                                 Loss functions                                #
#################################################################################


def massive_activation_mask(h: torch.Tensor, k: float) -> torch.Tensor:
    """True where h is within k standard deviations of its mean; statistics per sample, over tokens
    and channels. h: (N, T, D) -> (N, T, D) bool."""
    dims = tuple(range(1, h.dim()))
    h = h.detach().float()
    mean = h.mean(dim=dims, keepdim=True)
    std = h.std(dim=dims, keepdim=True)
    return (h - mean).abs() <= k * std


def masked_feature_loss(student: torch.Tensor, teacher: torch.Tensor, k: float | None) -> torch.Tensor:
    """MSE between hidden states over the positions that are not massive activations in either.

    Args:
        student, teacher: (N, T, D) hidden states of a mapped pair of blocks.
        k: the outlier threshold in standard deviations; None disables the mask.
    """
    diff2 = (student.float() - teacher.detach().float()) ** 2
    if k is None:
        return diff2.mean()
    keep = massive_activation_mask(student, k) & massive_activation_mask(teacher, k)
    return (diff2 * keep).sum() / keep.sum().clamp(min=1)


#################################################################################
#                                   Layer maps                                  #
#################################################################################

def parse_layer_map(text: str, student_depth: int, teacher_depth: int) -> dict[int, int]:
    """"0:0,1:2,..." (student block : teacher block) into a dict, validated against both depths."""
    mapping = {}
    for term in text.replace(" ", "").split(","):
        parts = term.split(":")
        if len(parts) != 2 or not all(p.lstrip("-").isdigit() for p in parts):
            raise UserError(f"--layer-map: cannot read {term!r}; write student:teacher pairs such as '0:0,1:2'")
        s, t = int(parts[0]), int(parts[1])
        if not (0 <= s < student_depth and 0 <= t < teacher_depth):
            raise UserError(f"--layer-map: {s}:{t} is out of range (student blocks 0..{student_depth - 1}, "
                             f"teacher blocks 0..{teacher_depth - 1})")
        if s in mapping:
            raise UserError(f"--layer-map: student block {s} is mapped twice")
        mapping[s] = t
    return mapping


def default_layer_map(lineage: dict | None, student_depth: int, teacher_depth: int, *,
                      clear: bool = False) -> dict[int, int]:
    """Student block i -> the teacher block it was copied from, read from the student's lineage. `clear`: for CLEAR,
    which compares attention layers and has no output-only mode to offer instead (its run refuses --beta-feat)."""
    if lineage is None:
        instead = "" if clear else ", or --beta-feat 0 for output KD only"
        raise UserError("the student checkpoint records no lineage (which teacher block each of its blocks came "
                         f"from): pass --layer-map, e.g. '0:0,1:2,...'{instead}")
    if lineage["source_depth"] != teacher_depth:
        raise UserError(f"the student was pruned from a model of depth {lineage['source_depth']} but the teacher "
                         f"has depth {teacher_depth}; use the teacher it was pruned from, or pass --layer-map")
    mapping = lineage_layer_map(lineage["kept_indices"])
    if len(mapping) != student_depth:
        raise UserError(f"the lineage lists {len(mapping)} blocks but the student has {student_depth}")
    return mapping


#################################################################################
#                                       Task                                    #
#################################################################################

class MaskedKDTask(Task):
    """alpha * KD + (1 - alpha) * GT + beta * FEAT, beta decaying linearly from beta_feat to 0.

    Args:
        process: the noise process (training example, losses, what KD compares).
        teacher: the frozen teacher (eval mode, on the student's device).
        student: the student (unwrapped), whose blocks the feature loss reads.
        layer_map: student flat block -> teacher flat block for FEAT.
        alpha_kd, beta_feat, mask_k: the loss weights and the outlier threshold (None: no mask).
    """

    def __init__(self, process: NoiseProcess, teacher: nn.Module, student: nn.Module, layer_map: dict[int, int],
                 alpha_kd: float, beta_feat: float, mask_k: float | None):
        if not 0.0 <= alpha_kd <= 1.0:
            raise UserError(f"--alpha-kd must be in [0, 1], got {alpha_kd}")
        if beta_feat < 0:
            raise UserError(f"--beta-feat must be non-negative, got {beta_feat}")
        self.process, self.teacher, self.layer_map = process, teacher, layer_map
        self.alpha, self.beta0, self.mask_k = alpha_kd, beta_feat, mask_k
        self.student_tap = self.teacher_tap = None
        if beta_feat > 0:
            self.student_tap = BlockRecorder(flat_blocks(student), list(layer_map))
            self.teacher_tap = BlockRecorder(flat_blocks(teacher), list(layer_map.values()))

    def beta(self, step: int, total_steps: int) -> float:
        """beta_feat decayed linearly to 0 over the run (a one-step run keeps beta_feat)."""
        return self.beta0 * (1.0 - step / max(total_steps, 1))

    def loss(self, model: nn.Module, batch: Batch, total_steps: int) -> dict[str, torch.Tensor]:
        student, teacher, gt = predict_with_teacher(self.process, model, self.teacher, batch)
        kd = self.process.distillation_loss(student, teacher).mean()
        out = {"kd": kd, "gt": gt}
        loss = self.alpha * kd + (1.0 - self.alpha) * gt
        beta = self.beta(batch.step, total_steps)
        if self.student_tap is not None:
            feat = torch.stack([
                masked_feature_loss(self.student_tap.outputs[s], self.teacher_tap.outputs[t], self.mask_k)
                for s, t in self.layer_map.items()]).mean()
            loss = loss + beta * feat
            out["feat"] = feat
        out["beta"] = torch.tensor(beta)
        out["loss"] = loss
        return out


def teacher_compatible_keys(family: type[nn.Module], config: dict) -> tuple[str, ...]:
    """The config keys on which a teacher of `family` must agree with its student: the family's
    `teacher_compatible_keys`; a family that declares none: every key of `config` but its stacks' depths and
    per-block widths (what pruning changes)."""
    declared = getattr(family, "teacher_compatible_keys", None)
    if declared is not None:
        return tuple(declared)
    pruned = {key for _, depth_key, widths_key in family.stacks.values() for key in (depth_key, widths_key) if key}
    return tuple(key for key in config if key not in pruned)


def check_teacher_fits(student: LoadedModel, teacher: LoadedModel, path: str) -> None:
    """The teacher must share the student's family, process and inputs, and the config keys its family names
    (`teacher_compatible_keys`: e.g. classes and width)."""
    s, t = student.config, teacher.config
    problems = []
    if student.arch != teacher.arch:
        problems.append(f"the student is a {student.arch}, the teacher a {teacher.arch}")
    if student.process != teacher.process:
        problems.append(f"their noise processes differ ({student.process} vs {teacher.process})")
    s_shape, t_shape = tuple(unwrap(student.model).data_shape), tuple(unwrap(teacher.model).data_shape)
    if s_shape != t_shape:
        problems.append(f"inputs {s_shape} vs {t_shape}")
    if student.arch == teacher.arch:
        for key in teacher_compatible_keys(type(unwrap(student.model)), s):
            if s.get(key) != t.get(key):
                problems.append(f"{key} {s.get(key)} vs {t.get(key)}")
    if problems:
        raise UserError(f"--load-teacher {path} cannot teach this student: {'; '.join(problems)}; use the model the "
                         "student was pruned from")


def run_masked_kd(args: MaskedKDOptions) -> None:
    """train_masked_kd.py: recover a pruned student by Masked KD from its teacher; with `--attention local`, distil
    local attention into the student by CLEAR (tinyfusion/clear.py), training its attention layers only."""
    if not args.load_weight:
        raise UserError("give the pruned student with --load-weight")
    if not args.load_teacher:
        raise UserError("give the teacher with --load-teacher: the model the student was pruned from")
    stated = args.stated_attention()
    clear = stated is not None and stated["kind"] == "local"
    check_method_flags(args, clear)
    method = "clear" if clear else "masked-kd"
    with start_run(args, default_prefix=f"{Path(args.load_weight).stem}-{method}",
                   outputs={"--save-model": args.save_model}) as run:
        student = model_for_training(args, run.dataset, run.logger)
        args = with_family_recipe(args, student.model)
        # The teacher's own settings: --num-heads is the student's (for a bare student state dict).
        teacher = load_model(args.load_teacher, args.teacher, weights=args.teacher_weights,
                             num_heads=args.teacher_num_heads)
        check_teacher_fits(student, teacher, args.load_teacher)
        model = student.model.to(run.env.device)
        set_grad_checkpointing(args, model, run.logger)
        teacher_model = teacher.model.to(run.env.device).eval().requires_grad_(False)
        s_depth, t_depth = total_depth(model), total_depth(teacher_model)
        if args.layer_map:
            mapping = parse_layer_map(args.layer_map, s_depth, t_depth)
        elif clear and student.lineage is None and s_depth == t_depth:
            mapping = {i: i for i in range(s_depth)}  # the teacher's own blocks, made local
        elif clear or args.beta_feat > 0:
            mapping = default_layer_map(student.lineage, s_depth, t_depth, clear=clear)
        else:
            mapping = {}
        run.logger.info(f"student: {parameter_count(model):,} parameters, depth {s_depth}; teacher: "
                        f"{parameter_count(teacher_model):,} parameters, depth {t_depth} ({args.load_teacher})"
                        + (f"; attention: student {describe_attention(student.config['attention'])}, teacher "
                           f"{describe_attention(teacher.config['attention'])}" if "attention" in teacher.config
                           else ""))
        run.logger.info("layer map (student block -> teacher block): "
                        + (", ".join(f"{s}->{t}" for s, t in mapping.items()) or "none (output KD only)"))
        process = create_process(student.process)
        if clear:
            trainable = train_only_attention(model)
            run.logger.info(f"CLEAR: loss = gt + {args.pred_weight:g} pred + {args.attn_weight:g} attn; training "
                            f"the attention layers only ({trainable:,} of {parameter_count(model):,} parameters)")
            task = ClearTask(process, teacher_model, model, mapping, pred_weight=args.pred_weight,
                             attn_weight=args.attn_weight)
            settings = {"method": method, "layer_map": {str(k): v for k, v in mapping.items()}}
        else:
            task = MaskedKDTask(process, teacher_model, model, mapping, alpha_kd=args.alpha_kd,
                                beta_feat=args.beta_feat, mask_k=None if args.mask_k <= 0 else args.mask_k)
            settings = {"layer_map": {str(k): v for k, v in mapping.items()}}
        steps = total_steps(args, run.dataset)
        train_and_save(args, run, student, model, task, process, steps, "train_masked_kd.py", settings=settings,
                       extra={"teacher": args.load_teacher, "method": method})


def check_method_flags(args: MaskedKDOptions, clear: bool) -> None:
    """The loss flags of the method that does not run are refused rather than ignored."""
    defaults = MaskedKDOptions()
    other = ("alpha_kd", "beta_feat", "mask_k") if clear else ("pred_weight", "attn_weight")
    given = [f"--{name.replace('_', '-')}" for name in other if getattr(args, name) != getattr(defaults, name)]
    if given:
        method = ("CLEAR's (--attention local): gt + pred + attn" if clear
                  else "Masked KD's; --pred-weight and --attn-weight weigh CLEAR's loss, with --attention local")
        raise UserError(f"{', '.join(given)}: this run's loss is {method}; drop {', '.join(given)}")
