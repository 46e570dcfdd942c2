"""Masked Knowledge Distillation (TinyFusion, section 3.3): recovering a pruned model from its teacher.

    loss = alpha * KD + (1 - alpha) * GT + beta * FEAT

KD is the distance between the student's and the teacher's predictions (MSE on the noise, plus
with learned variances the KL divergence between their Gaussians p(x_{t-1} | x_t)); GT is the
usual hybrid diffusion loss; FEAT is the MSE between hidden states of mapped blocks, where
positions holding massive activations (|h - mean| > k * std of their tensor, in the teacher or
the student) are masked out: those few huge values would otherwise dominate the loss and
destabilise the student. beta decays linearly to 0 over the run.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn

from diffusion import create_diffusion
from diffusion.losses import mean_flat, normal_kl
from models import layer_map as lineage_layer_map

from .checkpoint import load_model, save_model
from .distributed import barrier, cleanup
from .engine import Batch, Task, Trainer
from .training import (
    check_data_fits,
    checkpoint_record,
    model_for_training,
    parameter_count,
    run_settings,
    start_run,
    total_steps,
    train_config,
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


def output_kd_loss(diffusion, student_out: torch.Tensor, teacher_out: torch.Tensor, x_t: torch.Tensor,
                   t: torch.Tensor) -> torch.Tensor:
    """Per-sample distance between the student's and the teacher's predictions, (N,).

    MSE between the predicted noise; with learned variances plus KL(teacher || student) of their
    Gaussians p(x_{t-1} | x_t) in bits, where (as in the hybrid loss) the KL term trains only the
    student's variance output: the mean is matched by the MSE.
    """
    channels = x_t.shape[1]
    teacher_out = teacher_out.detach().float()
    student_out = student_out.float()
    loss = mean_flat((student_out[:, :channels] - teacher_out[:, :channels]) ** 2)
    if student_out.shape[1] == 2 * channels:
        frozen = torch.cat([student_out[:, :channels].detach(), student_out[:, channels:]], dim=1)
        p_student = diffusion.p_mean_variance(lambda *a, r=frozen: r, x_t, t, clip_denoised=False)
        p_teacher = diffusion.p_mean_variance(lambda *a, r=teacher_out: r, x_t, t, clip_denoised=False)
        kl = normal_kl(p_teacher["mean"], p_teacher["log_variance"], p_student["mean"], p_student["log_variance"])
        loss = loss + mean_flat(kl) / math.log(2.0)
    return loss


#################################################################################
#                                 Feature capture                               #
#################################################################################

class FeatureTap:
    """Keeps the output of chosen blocks of the latest forward pass (forward hooks on the blocks)."""

    def __init__(self, blocks: nn.ModuleList, indices: Sequence[int]):
        self.features: dict[int, torch.Tensor] = {}
        self._handles = [blocks[i].register_forward_hook(_Record(self.features, i)) for i in sorted(set(indices))]

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


class _Record:
    def __init__(self, store: dict, index: int):
        self.store, self.index = store, index

    def __call__(self, module, args, output):
        self.store[self.index] = output


def parse_layer_map(text: str, student_depth: int, teacher_depth: int) -> dict[int, int]:
    """"0:0,1:2,..." (student block : teacher block) into a dict, validated against both depths."""
    mapping = {}
    for term in text.replace(" ", "").split(","):
        parts = term.split(":")
        if len(parts) != 2 or not all(p.lstrip("-").isdigit() for p in parts):
            raise ValueError(f"--layer-map: cannot read {term!r}; write student:teacher pairs such as '0:0,1:2'")
        s, t = int(parts[0]), int(parts[1])
        if not (0 <= s < student_depth and 0 <= t < teacher_depth):
            raise ValueError(f"--layer-map: {s}:{t} is out of range (student blocks 0..{student_depth - 1}, "
                             f"teacher blocks 0..{teacher_depth - 1})")
        if s in mapping:
            raise ValueError(f"--layer-map: student block {s} is mapped twice")
        mapping[s] = t
    return mapping


def default_layer_map(lineage: dict | None, student_depth: int, teacher_depth: int) -> dict[int, int]:
    """Student block i -> the teacher block it was copied from, read from the student's lineage."""
    if lineage is None:
        raise ValueError("the student checkpoint records no lineage (which teacher block each of its blocks came "
                         "from): pass --layer-map, e.g. '0:0,1:2,...', or --beta-feat 0 for output KD only")
    if lineage["source_depth"] != teacher_depth:
        raise ValueError(f"the student was pruned from a model of depth {lineage['source_depth']} but the teacher "
                         f"has depth {teacher_depth}; use the teacher it was pruned from, or pass --layer-map")
    mapping = lineage_layer_map(lineage["kept_indices"])
    if len(mapping) != student_depth:
        raise ValueError(f"the lineage lists {len(mapping)} blocks but the student has {student_depth}")
    return mapping


#################################################################################
#                                       Task                                    #
#################################################################################

class MaskedKDTask(Task):
    """alpha * KD + (1 - alpha) * GT + beta * FEAT, beta decaying linearly from beta_feat to 0.

    Args:
        diffusion: the training diffusion (all timesteps).
        teacher: the frozen teacher (eval mode, on the student's device).
        student_blocks: the student's blocks (of the unwrapped model, for the feature taps).
        layer_map: student block -> teacher block for FEAT.
        alpha_kd, beta_feat, mask_k: the loss weights and the outlier threshold (None: no mask).
    """

    def __init__(self, diffusion, teacher: nn.Module, student_blocks: nn.ModuleList, layer_map: dict[int, int],
                 alpha_kd: float, beta_feat: float, mask_k: float | None):
        if not 0.0 <= alpha_kd <= 1.0:
            raise ValueError(f"--alpha-kd must be in [0, 1], got {alpha_kd}")
        if beta_feat < 0:
            raise ValueError(f"--beta-feat must be non-negative, got {beta_feat}")
        self.diffusion, self.teacher, self.layer_map = diffusion, teacher, layer_map
        self.alpha, self.beta0, self.mask_k = alpha_kd, beta_feat, mask_k
        self.student_tap = self.teacher_tap = None
        if beta_feat > 0:
            self.student_tap = FeatureTap(student_blocks, list(layer_map))
            self.teacher_tap = FeatureTap(teacher.blocks, list(layer_map.values()))

    def beta(self, step: int, total_steps: int) -> float:
        """beta_feat decayed linearly to 0 over the run (a one-step run keeps beta_feat)."""
        return self.beta0 * (1.0 - step / max(total_steps, 1))

    def loss(self, model: nn.Module, batch: Batch, total_steps: int) -> dict[str, torch.Tensor]:
        # The training diffusion uses every timestep, so model timesteps are the batch's timesteps.
        x_t = self.diffusion.q_sample(batch.x, batch.t, noise=batch.noise)
        kwargs = dict(y=batch.y, force_drop_ids=batch.drop_ids)
        student_out = model(x_t, batch.t, **kwargs)
        with torch.no_grad():
            teacher_out = self.teacher(x_t, batch.t, **kwargs)
        gt = self.diffusion.losses_from_output(student_out, batch.x, x_t, batch.t, batch.noise)["loss"].mean()
        kd = output_kd_loss(self.diffusion, student_out, teacher_out, x_t, batch.t).mean()
        out = {"kd": kd, "gt": gt}
        loss = self.alpha * kd + (1.0 - self.alpha) * gt
        beta = self.beta(batch.step, total_steps)
        if self.student_tap is not None:
            feat = torch.stack([
                masked_feature_loss(self.student_tap.features[s], self.teacher_tap.features[t], self.mask_k)
                for s, t in self.layer_map.items()]).mean()
            loss = loss + beta * feat
            out["feat"] = feat
        out["beta"] = torch.tensor(beta)
        out["loss"] = loss
        return out


def run_masked_kd(args: argparse.Namespace) -> None:
    """train_masked_kd.py: recover a pruned student by Masked KD from its teacher."""
    run = start_run(args, default_prefix=f"{Path(args.load_weight or 'student').stem}-masked-kd")
    try:
        if not args.load_weight:
            raise ValueError("give the pruned student with --load-weight")
        student = model_for_training(args, run.dataset, run.logger)
        teacher = load_model(args.load_teacher, args.teacher, weights=args.teacher_weights,
                             num_heads=args.num_heads)
        check_data_fits(teacher.config, run.dataset, "the teacher")
        model = student.model.to(run.env.device)
        if args.grad_checkpointing:
            model.gradient_checkpointing = True
        teacher_model = teacher.model.to(run.env.device).eval().requires_grad_(False)
        s_depth, t_depth = len(model.blocks), len(teacher_model.blocks)
        if args.layer_map:
            mapping = parse_layer_map(args.layer_map, s_depth, t_depth)
        elif args.beta_feat > 0:
            mapping = default_layer_map(student.lineage, s_depth, t_depth)
        else:
            mapping = {}
        run.logger.info(f"student: {parameter_count(model):,} parameters, depth {s_depth}; teacher: "
                        f"{parameter_count(teacher_model):,} parameters, depth {t_depth} ({args.load_teacher})")
        run.logger.info("layer map (student block -> teacher block): "
                        + (", ".join(f"{s}->{t}" for s, t in mapping.items()) or "none (output KD only)"))
        diffusion = create_diffusion("", learn_sigma=student.config["learn_sigma"])
        task = MaskedKDTask(diffusion, teacher_model, model.blocks, mapping, alpha_kd=args.alpha_kd,
                            beta_feat=args.beta_feat, mask_k=None if args.mask_k <= 0 else args.mask_k)
        steps = total_steps(args, run.dataset)
        trainer = Trainer(
            env=run.env, model=model, param_groups=[{"params": [p for p in model.parameters() if p.requires_grad]}],
            task=task, dataset=run.dataset, config=train_config(args, run, steps),
            num_timesteps=diffusion.num_timesteps, label_dropout=student.config["class_dropout_prob"],
            settings=run_settings(args, precision=run.precision, layer_map={str(k): v for k, v in mapping.items()}),
            logger=run.logger, record=lambda: checkpoint_record(student, "train_masked_kd.py"))
        ema = trainer.fit()
        if args.save_model and run.env.is_main:
            save_model(args.save_model, model, ema=ema, lineage=student.lineage,
                       extra={"script": "train_masked_kd.py", "steps": steps, "teacher": args.load_teacher,
                              "initialised_from": student.path})
            run.logger.info(f"saved {args.save_model}")
        barrier()
    finally:
        cleanup()
