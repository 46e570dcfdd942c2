"""Pruning: one module per method, the surgery in `models.surgery`.

- `learned`: TinyFusion's learned depth decision (N:M gates, prune_by_learning.py);
- `depth`: depth by a per-block score (ShortGPT block influence, loss sensitivity, random; prune_by_score.py);
- `width`: Diff-Pruning's width criteria (Taylor over timesteps, magnitude, random): attention heads and MLP
  channels per block (prune_by_score.py --width-ratio);
- `index`: depth by chosen indices or a preset pattern (prune_by_index.py);
- `saving`: the pruned-model file every method writes, with its lineage.
"""

from .depth import (
    CRITERIA,
    block_influence,
    format_score_table,
    loss_sensitivity,
    random_scores,
    run_prune_by_score,
    select_kept,
    select_kept_per_stack,
    stack_targets,
)
from .index import first_k_indices, kept_from_pruned, oracle_indices, run_prune_by_index
from .learned import (
    GATE_EMA_WINDOW,
    LearnedPruningTask,
    gate_ema_decay,
    linear_anneal,
    plot_decisions,
    read_decision_history,
    run_prune_by_learning,
)
from .saving import save_pruned
from .width import (
    TAYLOR_THRESHOLD,
    WIDTH_CRITERIA,
    TimestepWalk,
    UnitScores,
    accumulate_taylor_gradients,
    magnitude_scores,
    random_unit_scores,
    select_units,
    taylor_scores,
    walk_timesteps,
    width_decision,
)

__all__ = [
    "CRITERIA", "GATE_EMA_WINDOW", "LearnedPruningTask", "TAYLOR_THRESHOLD", "TimestepWalk", "UnitScores",
    "WIDTH_CRITERIA", "accumulate_taylor_gradients", "block_influence", "first_k_indices", "format_score_table",
    "gate_ema_decay", "kept_from_pruned", "linear_anneal", "loss_sensitivity", "magnitude_scores", "oracle_indices",
    "plot_decisions", "random_scores", "random_unit_scores", "read_decision_history", "run_prune_by_index",
    "run_prune_by_learning", "run_prune_by_score", "save_pruned", "select_kept", "select_kept_per_stack",
    "select_units", "stack_targets", "taylor_scores", "walk_timesteps", "width_decision",
]
