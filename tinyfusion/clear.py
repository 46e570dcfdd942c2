"""CLEAR distillation (Liu, Tan & Wang, 2024): a model with local attention learns from its global original.

The student is the teacher's model (or a depth- or width-pruned one) whose attention layers were made local
(`models.attention.convert_attention`). Only the attention weights train, qkv and the output projection of
every block; every other tensor stays bitwise what it was. The loss is CLEAR's:

    loss = GT + 0.5 * PRED + 0.5 * ATTN

GT is the process's training loss; PRED the distance between the student's and the teacher's predictions
(the process's `distillation_loss`: DiT's noise MSE with the KL of its learned variances, the transport's
velocity MSE, the flow-matching MSE of CLEAR's FLUX runs); ATTN the MSE between the output of each student
attention layer and that of the teacher layer it came from, averaged over layers. CLEAR distils on the
teacher's own samples: `sample_ddp.py --save-latents DIR` writes them as a feature set.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from models import BlockRecorder, flat_blocks
from models.attention import attention_modules, block_attention
from processes import NoiseProcess

from .engine import Batch, Task
from .errors import UserError
from .training import predict_with_teacher


def train_only_attention(model: nn.Module) -> int:
    """Freeze every parameter of `model` but those of its attention layers; returns how many stay trainable."""
    model.requires_grad_(False)
    for module in attention_modules(model):
        module.requires_grad_(True)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


class ClearTask(Task):
    """GT + pred_weight * PRED + attn_weight * ATTN (CLEAR's weights: 0.5 and 0.5).

    Args:
        process: the noise process (training example, losses, what PRED compares).
        teacher: the frozen original model (eval mode, on the student's device).
        student: the student (unwrapped), whose attention layers ATTN reads.
        layer_map: student flat block -> teacher flat block whose attention outputs ATTN compares.
        pred_weight, attn_weight: the weights of PRED and ATTN.
    """

    def __init__(self, process: NoiseProcess, teacher: nn.Module, student: nn.Module, layer_map: dict[int, int],
                 pred_weight: float = 0.5, attn_weight: float = 0.5):
        for flag, value in (("--pred-weight", pred_weight), ("--attn-weight", attn_weight)):
            if value < 0:
                raise UserError(f"{flag} must be non-negative, got {value}")
        if not layer_map:
            raise UserError("CLEAR compares every student attention layer with a teacher layer, and the layer map "
                             "is empty: drop --layer-map or list the pairs")
        self.process, self.teacher, self.layer_map = process, teacher, layer_map
        self.pred_weight, self.attn_weight = pred_weight, attn_weight
        self.student_tap = BlockRecorder([block_attention(b) for b in flat_blocks(student)], list(layer_map))
        self.teacher_tap = BlockRecorder([block_attention(b) for b in flat_blocks(teacher)], list(layer_map.values()))

    def loss(self, model: nn.Module, batch: Batch, total_steps: int) -> dict[str, torch.Tensor]:
        student, teacher, gt = predict_with_teacher(self.process, model, self.teacher, batch)
        pred = self.process.distillation_loss(student, teacher).mean()
        attn = torch.stack([
            ((self.student_tap.outputs[s].float() - self.teacher_tap.outputs[t].detach().float()) ** 2).mean()
            for s, t in self.layer_map.items()]).mean()
        loss = gt + self.pred_weight * pred + self.attn_weight * attn
        return {"gt": gt, "pred": pred, "attn": attn, "loss": loss}
