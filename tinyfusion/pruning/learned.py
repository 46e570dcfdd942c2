"""Learned depth pruning: TinyFusion's decision of which blocks to keep.

Learned pruning (TinyFusion, section 3): the model's blocks carry N:M gates sampled per sample
with a hard Gumbel-softmax whose temperature tau (and logit scaling) anneal linearly over the
run, trained jointly with LoRA or full weight updates that simulate the fine-tuning to come.
The decision is read from the EMA of the gates; the weight updates are then thrown away and the
kept blocks are cut from the ORIGINAL weights.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn

from models import GatedModel, format_groups, parse_stack_groups, stack_depths
from processes import NoiseProcess, create_process

from ..checkpoint import LoadedModel, load_model, load_with_flags
from ..distributed import barrier
from ..engine import Trainer
from ..errors import UserError
from ..lora import DEFAULT_TARGETS, add_lora, trainable_fraction
from ..options import LearnedPruningOptions
from ..training import (
    DiffusionTask,
    adopt_data_codec,
    check_data_fits,
    run_settings,
    set_grad_checkpointing,
    start_run,
    total_steps,
    train_config,
)
from .saving import save_pruned

# The gate EMA's window (1 / (1 - decay)) as a share of the run when --ema-decay is not given: long enough
# to smooth the per-sample Gumbel noise, short enough that the decision read at the end is the gates' own,
# not a memory of the run's first half (a decay of 0.999 over 500 steps averages two thirds of the run).
GATE_EMA_WINDOW = 0.1


def gate_ema_decay(steps: int) -> float:
    """The gate EMA decay for a run of `steps` steps: a window of GATE_EMA_WINDOW of the run (at least 1 step),
    at most 0.9999: 0.98 for 500 steps, 0.999 for 10,000."""
    window = max(1.0, GATE_EMA_WINDOW * steps)
    return min(1.0 - 1.0 / window, 0.9999)


def linear_anneal(start: float, end: float, step: int, total_steps: int) -> float:
    """start -> end linearly over steps 0 .. total_steps - 1 (TinyFusion anneals tau and scaling per step)."""
    return start + (end - start) * step / max(total_steps - 1, 1)


class LearnedPruningTask(DiffusionTask):
    """The process's training loss through gated blocks, with tau and the logit scaling annealed per step.

    Args:
        process: the noise process.
        gated: the gated model being trained (unwrapped).
        tau_range, scaling_range: (start, end) of the Gumbel temperature and of the logit scaling.
        run_dir: where decisions.jsonl is appended on every log step.
    """

    log_files = ("decisions.jsonl",)

    def __init__(self, process: NoiseProcess, gated: GatedModel, tau_range: Sequence[float],
                 scaling_range: Sequence[float], run_dir: Path, stop_confidence: float | None = None):
        super().__init__(process)
        for name, (start, end) in (("--tau-range", tau_range), ("--scaling-range", scaling_range)):
            if start <= 0 or end <= 0:
                raise UserError(f"{name} values must be positive, got {start} {end}")
        if stop_confidence is not None and not 0.0 < stop_confidence < 1.0:
            raise UserError(f"--stop-at-confidence must be in (0, 1), got {stop_confidence}")
        self.gated, self.tau_range, self.scaling_range, self.run_dir = gated, tau_range, scaling_range, run_dir
        self.stop_confidence = stop_confidence
        self.gate_options = sum(gated.gates.num_options)

    def before_step(self, step: int, total_steps: int) -> None:
        self.gated.gates.tau = linear_anneal(*self.tau_range, step, total_steps)
        self.gated.gates.scaling = linear_anneal(*self.scaling_range, step, total_steps)

    def log_fields(self, ema: nn.Module) -> dict:
        ema.gates.scaling = self.gated.gates.scaling
        decision, raw = ema.decisions(), self.gated.decisions()
        return {"kept_indices": decision["kept_indices"], "confidence": decision["confidence"],
                "raw_kept_indices": raw["kept_indices"], "raw_confidence": raw["confidence"],
                "tau": self.gated.gates.tau, "scaling": self.gated.gates.scaling}

    def describe(self, fields: dict) -> str:
        conf = fields["confidence"]
        return (f"tau {fields['tau']:.3g} kept {fields['kept_indices']} confidence min {min(conf):.3f} "
                f"mean {sum(conf) / len(conf):.3f}")

    def finished(self, fields: dict) -> str | None:
        """With --stop-at-confidence C: done once every group's EMA confidence reaches C and the raw gates keep
        the same blocks (a decision that no longer moves), judged at a log step."""
        if self.stop_confidence is None:
            return None
        lowest = min(fields["confidence"])
        if lowest >= self.stop_confidence and fields["kept_indices"] == fields["raw_kept_indices"]:
            return (f"every group's EMA confidence is at least {self.stop_confidence:g} (lowest {lowest:.3f}) and "
                    "the raw gates agree (--stop-at-confidence)")
        return None

    def on_log(self, record: dict) -> None:
        with open(self.run_dir / "decisions.jsonl", "a") as f:
            f.write(json.dumps({k: record[k] for k in ("step", "loss", "kept_indices", "confidence", "raw_kept_indices",
                                                         "raw_confidence", "tau", "scaling")}) + "\n")


def read_decision_history(path: Path) -> list[dict]:
    """decisions.jsonl, one record per step (a resumed run may log a step twice: the last one wins)."""
    by_step = {}
    for line in path.read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            by_step[record["step"]] = record
    return [by_step[s] for s in sorted(by_step)]


def plot_decisions(history: list[dict], depth: int, path: Path) -> None:
    """A picture of how the decision evolved: kept blocks per log step, and the group confidences."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in history]
    kept = torch.zeros(depth, len(history))
    for j, r in enumerate(history):
        kept[r["kept_indices"], j] = 1.0
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6), sharex=True, gridspec_kw={"height_ratios": [2, 1]})
    top.imshow(kept.numpy(), aspect="auto", cmap="Greens", interpolation="nearest",
               extent=(steps[0] - 0.5, steps[-1] + 0.5, depth - 0.5, -0.5))
    top.set_ylabel("block (green = kept)")
    top.set_title("TinyFusion decision (from the EMA gates)")
    confidence = torch.tensor([r["confidence"] for r in history])
    for g in range(confidence.shape[1]):
        bottom.plot(steps, confidence[:, g].numpy(), linewidth=1)
    bottom.set_ylim(0, 1.02)
    bottom.set_ylabel("group confidence")
    bottom.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _gated_source(args: LearnedPruningOptions) -> LoadedModel:
    if args.model is None and args.groups is None:
        raise UserError("give a gated model (e.g. --model DiT-XL-1-2) or N:M groups (--groups 14x1:2)")
    loaded = load_with_flags(args.load_weight, args)
    if args.groups is not None:
        base = loaded.model.release() if isinstance(loaded.model, GatedModel) else loaded.model
        loaded.model = GatedModel(base, parse_stack_groups(args.groups, stack_depths(base)))
    if not isinstance(loaded.model, GatedModel):
        raise UserError(f"--model {args.model} has no gates: use a gated preset (e.g. DiT-XL-1-2) or add --groups")
    return loaded


def run_prune_by_learning(args: LearnedPruningOptions) -> None:
    """prune_by_learning.py: learn which blocks to keep, then cut them from the original weights."""
    if args.lora and not args.delta_w:
        raise UserError("--lora chooses how weights are updated and needs --delta-w")
    if not args.save_model:
        raise UserError("give --save-model: where to write the pruned model")
    name = (args.model or Path(args.load_weight).stem).replace("/", "-")
    with start_run(args, default_prefix=f"{name}-learned-pruning", outputs={"--save-model": args.save_model}) as run:
        loaded = _gated_source(args)
        gated = loaded.model.to(run.env.device)
        set_grad_checkpointing(args, gated, run.logger)
        check_data_fits(gated, run.dataset)
        adopt_data_codec(loaded, run.dataset, run.logger)
        groups = gated.gates.groups
        weights: list[nn.Parameter] = []
        if args.delta_w and args.lora:
            weights = add_lora(gated.model, rank=args.lora_rank, alpha=args.lora_alpha,
                               targets=args.lora_targets or list(DEFAULT_TARGETS))
        else:
            gated.model.requires_grad_(args.delta_w)
            weights = [p for p in gated.model.parameters() if p.requires_grad]
        gated.gates.requires_grad_(True)
        n_weights, n_total = trainable_fraction(gated.model, weights)
        run.logger.info(f"groups {format_groups(groups)}: depth {gated.gates.depth} -> "
                        f"{sum(n for n, _ in groups)}; {sum(gated.gates.num_options)} gate logits; weight updates: "
                        + ("none" if not weights else f"{'LoRA rank ' + str(args.lora_rank) if args.lora else 'full'}"
                           f", {n_weights:,} of {n_total:,} parameters ({n_weights / n_total:.2%})"))
        param_groups = [{"params": list(gated.gates.parameters()), "lr": args.lr * args.gate_lr_mult}]
        if weights:
            param_groups.insert(0, {"params": weights, "lr": args.lr})
        process = create_process(loaded.process)
        task = LearnedPruningTask(process, gated, args.tau_range, args.scaling_range, run.run_dir,
                                  stop_confidence=args.stop_at_confidence)
        steps = total_steps(args, run.dataset)
        ema_decay = args.ema_decay if args.ema_decay is not None else gate_ema_decay(steps)
        run.logger.info(f"gate EMA decay {ema_decay:.6g} (a window of {1 / (1 - ema_decay):.0f} of {steps} steps"
                        + (", from the run length" if args.ema_decay is None else "") + ")")
        record = {"kind": "pruning", "arch": loaded.arch, "config": loaded.config, "process": loaded.process,
                  "codec": loaded.codec, "lineage": loaded.lineage,
                  "extra": {"script": "prune_by_learning.py", "groups": format_groups(groups)}}
        trainer = Trainer(
            env=run.env, model=gated, param_groups=param_groups, task=task, dataset=run.dataset,
            config=dataclasses.replace(train_config(args, run, steps), ema_decay=ema_decay), process=process,
            settings=run_settings(args, precision=run.precision, groups=format_groups(groups),
                                  ema_decay_used=ema_decay),
            logger=run.logger, record=lambda: record)
        ema = trainer.fit()
        if run.env.is_main:
            ema.gates.scaling = gated.gates.scaling
            decision, raw = ema.decisions(), gated.decisions()
            run.logger.info(f"decision (EMA gates): kept {decision['kept_indices']}, confidence "
                            + " ".join(f"{c:.3f}" for c in decision["confidence"]))
            if raw["kept_indices"] != decision["kept_indices"]:
                run.logger.warning(
                    f"warning: the raw gates keep {raw['kept_indices']} but their EMA (decay {ema_decay:.6g}) keeps "
                    f"{decision['kept_indices']}: the EMA still remembers earlier steps; the EMA decision is saved. "
                    "A longer run, or a smaller --ema-decay, lets them agree")
            # The weight updates only simulated fine-tuning: the pruned model starts from the original weights.
            original = load_model(args.load_weight, loaded.arch, weights=args.weights, num_heads=args.num_heads,
                                      attention=args.stated_attention())
            original.process, original.codec = loaded.process, loaded.codec
            summary = {"kept_indices": decision["kept_indices"], "confidence": decision["confidence"],
                       "options": decision["options"], "raw_kept_indices": raw["kept_indices"],
                       "raw_confidence": raw["confidence"], "ema_decay": ema_decay,
                       "groups": format_groups(groups), "steps": steps, "steps_run": trainer.step,
                       "ended_early": trainer.finished,
                       "settings": run_settings(args, precision=run.precision)}
            save_pruned(original, decision["kept_indices"], args.save_model, "learned", run.logger,
                        extra={"decision": summary})
            (run.run_dir / "decisions.json").write_text(json.dumps(summary, indent=1))
            history = read_decision_history(run.run_dir / "decisions.jsonl")
            if history:
                plot_decisions(history, gated.gates.depth, run.run_dir / "decisions.png")
                run.logger.info(f"decision history plotted in {run.run_dir / 'decisions.png'}")
        barrier()
