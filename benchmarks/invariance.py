r"""How much training depends on the number of processes: the same run on 1 and on 2 processes, side by side.

Usage (from the repository root; CPU and gloo are enough):
    python -m benchmarks.invariance --steps 50 --out results/invariance.json

Runs train.py and prune_by_learning.py (1:2 gates, LoRA) on a small synthetic feature set with 1 and 2
processes (torchrun) and prints, per script: the largest parameter difference after the run (absolute, and
relative to the parameter's scale), the largest difference of a logged loss, and, for pruning, both
decisions and their confidences. Every random draw and the data order are the same function of the seed
for any process count (bitwise); what differs is the order of floating-point additions in the gradient
all-reduce (a mean of two half-batch means instead of one mean), and that difference grows over steps.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from tinyfusion.args import Parser, positive_int
from tinyfusion.checkpoint import read_checkpoint
from tinyfusion.cli import run_script
from tinyfusion.features import write_index, write_shard
from tinyfusion.fileio import atomic_write_json
from tinyfusion.paths import check_outputs
from tinyfusion.synthetic import class_pattern_latents

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv=None):
    parser = Parser(__doc__)
    parser.add_argument("--steps", type=positive_int, default=50, help="optimisation steps of each run")
    parser.add_argument("--batch-size", type=positive_int, default=16, help="global batch")
    parser.add_argument("--out", type=str, default=None, help="also write the numbers as JSON")
    return parser.parse_args(argv)


def _features(root: Path) -> Path:
    latents, labels = class_pattern_latents(256, (3, 8, 8))
    write_shard(root, 0, latents, labels)
    write_index(root, 1, num_classes=10, class_names=[str(i) for i in range(10)], source={})
    return root


def _run(script: list[str], nproc: int) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    subprocess.run([*launcher, *script], cwd=REPO, env=env, check=True, capture_output=True, text=True)


def _compare(a: Path, b: Path, key: str = "model") -> dict:
    sa, sb = read_checkpoint(a)[key], read_checkpoint(b)[key]
    abs_diff = max(float((sa[k].float() - sb[k].float()).abs().max()) for k in sa)
    rel_diff = max(float((sa[k].float() - sb[k].float()).abs().max() / (sa[k].float().abs().max() + 1e-12))
                   for k in sa)
    return {"max_abs_param_diff": abs_diff, "max_rel_param_diff": rel_diff}


def _losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def main(args) -> dict:
    check_outputs({"--out": args.out}, {})  # writable, before the runs (its inputs are made here)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = _features(tmp / "features")
        common = ["--data-path", str(data), "--global-batch-size", str(args.batch_size), "--num-workers", "0",
                  "--max-steps", str(args.steps), "--ckpt-every", str(args.steps), "--log-every", "5",
                  "--device", "cpu"]
        scratch = tmp / "scratch.pt"
        for nproc in (1, 2):
            _run(["train.py", "--model", "DiT-Nano/2", *common, "--lr", "1e-3", "--results-dir", str(tmp),
                  "--prefix", f"train{nproc}", "--save-model", str(scratch) if nproc == 1 else str(tmp / "s2.pt")],
                 nproc)
        last = f"checkpoints/step-{args.steps:07d}.pt"
        train = _compare(tmp / "train1" / last, tmp / "train2" / last)
        l1, l2 = _losses(tmp / "train1"), _losses(tmp / "train2")
        train["max_loss_diff"] = max(abs(x - y) for x, y in zip(l1, l2))
        train["bitwise_equal"] = train["max_abs_param_diff"] == 0.0
        results["train.py"] = train

        for nproc in (1, 2):
            _run(["prune_by_learning.py", "--load-weight", str(scratch), "--groups", "4x1:2", "--delta-w", "--lora",
                  *common, "--results-dir", str(tmp), "--prefix", f"prune{nproc}",
                  "--save-model", str(tmp / f"pruned{nproc}.pt")], nproc)
        prune = _compare(tmp / "prune1" / last, tmp / "prune2" / last)
        l1, l2 = _losses(tmp / "prune1"), _losses(tmp / "prune2")
        prune["max_loss_diff"] = max(abs(x - y) for x, y in zip(l1, l2))
        for nproc in (1, 2):
            decision = json.loads((tmp / f"prune{nproc}" / "decisions.json").read_text())
            prune[f"kept_{nproc}proc"] = decision["kept_indices"]
            prune[f"confidence_{nproc}proc"] = [round(c, 6) for c in decision["confidence"]]
        results["prune_by_learning.py"] = prune

    print(f"{args.steps} steps, global batch {args.batch_size}, 1 vs 2 processes (CPU, gloo), "
          f"torch {torch.__version__}")
    for script, r in results.items():
        print(f"{script}: max |param diff| {r['max_abs_param_diff']:.3g} (relative {r['max_rel_param_diff']:.3g}), "
              f"max |loss diff| {r['max_loss_diff']:.3g}"
              + (f", kept {r['kept_1proc']} vs {r['kept_2proc']}, confidence {r['confidence_1proc']} vs "
                 f"{r['confidence_2proc']}" if "kept_1proc" in r else ""))
    if args.out:
        atomic_write_json(args.out, {"steps": args.steps, "batch_size": args.batch_size, **results})
    return results


if __name__ == "__main__":
    run_script(main, parse_args)
