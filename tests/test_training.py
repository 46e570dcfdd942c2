"""Recovery: train.py and train_masked_kd.py through the real CLI, and the Masked KD loss."""

import json

import numpy as np
import pytest
import torch
from helpers import interrupt_with_sigterm, run_cli, tiny_dit, write_features

from models import prune_depth
from processes import GaussianProcess, Prediction
from tinyfusion.checkpoint import load_model, pruned_lineage, read_checkpoint, save_model
from tinyfusion.engine import Batch
from tinyfusion.kd import MaskedKDTask, default_layer_map, masked_feature_loss, parse_layer_map

#################################################################################
#                                 The KD loss                                   #
#################################################################################


def test_masked_kd_loss_is_zero_for_a_copy_of_the_teacher():
    teacher = tiny_dit(depth=4).eval()
    student = prune_depth(teacher, [0, 1, 2, 3]).eval()
    task = MaskedKDTask(GaussianProcess(), teacher, student, {i: i for i in range(4)}, alpha_kd=0.9,
                        beta_feat=0.5, mask_k=2.0)
    g = torch.Generator().manual_seed(0)
    batch = Batch(x=torch.randn(4, 4, 8, 8, generator=g), y=torch.tensor([1, 2, 3, 4]),
                  draws={"t": torch.tensor([0, 10, 500, 999]), "noise": torch.randn(4, 4, 8, 8, generator=g)},
                  drop_ids=torch.tensor([0, 1, 0, 0]), gate_uniform=None, step=0)
    out = task.loss(student, batch, total_steps=10)
    assert out["kd"].item() == pytest.approx(0.0, abs=1e-7) and out["feat"].item() == 0.0
    assert out["gt"].item() > 0
    assert out["loss"].item() == pytest.approx(0.1 * out["gt"].item(), rel=1e-6)


def test_planted_outliers_change_the_unmasked_loss_but_not_the_masked_one():
    g = torch.Generator().manual_seed(0)
    # uniform values stay within sqrt(3) < 2 std of their mean: nothing is masked before planting
    teacher = torch.rand(2, 16, 32, generator=g) * 2 - 1
    student = teacher + 0.1 * (torch.rand(2, 16, 32, generator=g) * 2 - 1)
    masked, unmasked = masked_feature_loss(student, teacher, k=2.0), masked_feature_loss(student, teacher, k=None)
    assert masked.item() == pytest.approx(unmasked.item(), rel=1e-6)
    planted_t, planted_s = teacher.clone(), student.clone()
    planted_t[:, 3, 7], planted_s[:, 3, 7] = 400.0, -300.0  # massive activations at one position
    planted_t[1, 9, 2] = 250.0  # and one in the teacher alone
    assert masked_feature_loss(planted_s, planted_t, k=None).item() > 100 * unmasked.item()
    # masked: exactly the loss of the untouched positions
    keep = torch.ones_like(teacher, dtype=torch.bool)
    keep[:, 3, 7] = keep[1, 9, 2] = False
    expected = ((student - teacher) ** 2)[keep].mean()
    assert masked_feature_loss(planted_s, planted_t, k=2.0).item() == pytest.approx(expected.item(), rel=1e-6)


def test_output_kd_is_zero_for_equal_outputs_and_positive_otherwise():
    process = GaussianProcess()
    x_t, t = torch.randn(3, 4, 8, 8), torch.tensor([0, 300, 999])
    out = torch.randn(3, 8, 8, 8)
    same = process.distillation_loss(Prediction(out, x_t, t), Prediction(out, x_t, t))
    torch.testing.assert_close(same, torch.zeros(3), atol=1e-6, rtol=0)
    other = out.clone()
    other[:, 4:] += 0.3  # the variance alone differs: the KL term sees it
    assert (process.distillation_loss(Prediction(other, x_t, t), Prediction(out, x_t, t)) > 0).all()


def test_teacher_sees_the_students_inputs_and_dropped_labels():
    seen = {}

    class Spy(torch.nn.Module):
        stacks = {"blocks": ("blocks", "depth", None)}

        def __init__(self, model, name):
            super().__init__()
            self.model, self.name = model, name
            self.blocks = model.blocks

        def forward(self, x, t, **kwargs):
            seen[self.name] = (x.clone(), t.clone(), kwargs["y"].clone(), kwargs["force_drop_ids"].clone())
            return self.model(x, t, **kwargs)

    teacher, student = Spy(tiny_dit(depth=4), "teacher"), Spy(tiny_dit(depth=2), "student")
    task = MaskedKDTask(GaussianProcess(), teacher, student, {0: 0, 1: 3}, 0.9, 0.01, 2.0)
    batch = Batch(x=torch.randn(3, 4, 8, 8), y=torch.tensor([1, 2, 3]),
                  draws={"t": torch.tensor([5, 50, 500]), "noise": torch.randn(3, 4, 8, 8)},
                  drop_ids=torch.tensor([1, 0, 1]), gate_uniform=None, step=0)
    task.loss(student, batch, 5)
    for a, b in zip(seen["student"], seen["teacher"]):
        assert torch.equal(a, b)
    assert torch.equal(seen["teacher"][3], batch.drop_ids)


def test_layer_map_follows_the_kept_indices(tmp_path):
    teacher = tiny_dit(depth=6)
    save_model(tmp_path / "t.pt", teacher)
    source = load_model(tmp_path / "t.pt")
    lineage = pruned_lineage(source, [0, 3, 5], method="index")
    assert default_layer_map(lineage, 3, 6) == {0: 0, 1: 3, 2: 5}
    with pytest.raises(ValueError, match="pruned from a model of depth 6"):
        default_layer_map(lineage, 3, 4)
    with pytest.raises(ValueError, match="no lineage"):
        default_layer_map(None, 3, 6)
    assert parse_layer_map("0:1, 2:5", 3, 6) == {0: 1, 2: 5}
    for bad, message in (("0:9", "out of range"), ("0-1", "cannot read"), ("0:1,0:2", "mapped twice")):
        with pytest.raises(ValueError, match=message):
            parse_layer_map(bad, 3, 6)


#################################################################################
#                                Through the CLI                                #
#################################################################################

def _metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _train(planted, tmp_path, *extra, prefix="train", nproc=1, check=True, data=None):
    return run_cli(["train.py", "--model", "DiT-Nano/2", "--data-path", str(data or planted["data"]),
                    "--results-dir", str(tmp_path), "--prefix", prefix, "--global-batch-size", "8",
                    "--num-workers", "0", "--log-every", "5", *extra], nproc=nproc, check=check)


@pytest.fixture(scope="module")
def student(planted, tmp_path_factory):
    """The planted model with one essential block removed: a student with something to recover."""
    root = tmp_path_factory.mktemp("student")
    source = load_model(planted["ckpt"])
    path = root / "student.pt"
    save_model(path, prune_depth(source.model, [0, 1, 3]), lineage=pruned_lineage(source, [0, 1, 3], "index"))
    return path


def _kd(planted, student, tmp_path, *extra, prefix="kd", nproc=1):
    return run_cli(["train_masked_kd.py", "--load-weight", str(student), "--load-teacher", str(planted["ckpt"]),
                    "--data-path", str(planted["data"]), "--results-dir", str(tmp_path), "--prefix", prefix,
                    "--global-batch-size", "16", "--num-workers", "0", "--log-every", "5", "--lr", "1e-3",
                    *extra], nproc=nproc)


def test_train_from_scratch_loss_falls(planted, tmp_path):
    _train(planted, tmp_path, "--max-steps", "30", "--lr", "1e-3", "--save-model", str(tmp_path / "final.pt"))
    losses = [m["loss"] for m in _metrics(tmp_path / "train")]
    assert len(losses) == 6 and losses[-1] < 0.8 * losses[0]
    final = load_model(tmp_path / "final.pt")
    assert final.weights == "ema" and final.config["depth"] == 8 and final.config["num_classes"] == 10


def test_masked_kd_loss_falls_and_the_layer_map_is_printed(planted, student, tmp_path):
    proc = _kd(planted, student, tmp_path, "--max-steps", "20")
    assert "layer map (student block -> teacher block): 0->0, 1->1, 2->3" in proc.stdout
    metrics = _metrics(tmp_path / "kd")
    assert metrics[-1]["kd"] < 0.7 * metrics[0]["kd"] and metrics[-1]["loss"] < metrics[0]["loss"]
    assert metrics[0]["beta"] == pytest.approx(0.01 * (1 - 2 / 20))  # mean of steps 0..4 of the linear decay
    ckpt = read_checkpoint(tmp_path / "kd" / "checkpoints" / "step-0000020.pt")
    assert ckpt["lineage"]["kept_indices"] == [0, 1, 3]  # the student's lineage travels on


def _params(run_dir, step):
    return read_checkpoint(run_dir / "checkpoints" / f"step-{step:07d}.pt")["model"]


def test_sigterm_saves_and_the_resumed_run_equals_a_straight_run(planted, tmp_path):
    args = ["--max-steps", "30", "--ckpt-every", "1000", "--log-every", "1"]
    _train(planted, tmp_path, *args, prefix="straight")
    interrupt_with_sigterm(["train.py", "--model", "DiT-Nano/2", "--data-path", str(planted["data"]), "--results-dir",
                            str(tmp_path), "--prefix", "resumed", "--global-batch-size", "8", "--num-workers", "0",
                            *args], tmp_path / "resumed" / "metrics.jsonl", after_lines=3)
    stopped_at = read_checkpoint(sorted((tmp_path / "resumed" / "checkpoints").glob("*.pt"))[-1])
    assert 3 <= stopped_at["training_state"]["step"] < 30
    _train(planted, tmp_path, *args, prefix="resumed")
    a, b = _params(tmp_path / "straight", 30), _params(tmp_path / "resumed", 30)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_gradient_accumulation_equals_one_big_batch(planted, tmp_path):
    _train(planted, tmp_path, "--max-steps", "3", "--ckpt-every", "3", prefix="whole")
    _train(planted, tmp_path, "--max-steps", "3", "--ckpt-every", "3", "--micro-batch-size", "2", prefix="micro")
    a, b = _params(tmp_path / "whole", 3), _params(tmp_path / "micro", 3)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4)


def test_two_processes_give_the_same_parameters(planted, student, tmp_path):
    for nproc in (1, 2):
        _kd(planted, student, tmp_path, "--max-steps", "4", prefix=f"kd{nproc}", nproc=nproc)
    a, b = _params(tmp_path / "kd1", 4), _params(tmp_path / "kd2", 4)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4)


def test_a_non_finite_batch_is_skipped_and_counted_and_a_run_of_them_stops(tmp_path):
    rng = np.random.default_rng(0)
    latents = rng.standard_normal((32, 1, 4, 8, 8)).astype(np.float32)
    latents[5] = np.nan  # one poisoned image: one step in four sees it
    data = write_features(tmp_path / "nan", latents, rng.integers(0, 10, 32), 10)
    _train(None, tmp_path, "--max-steps", "8", "--log-every", "8", data=data, prefix="one-bad")
    record = _metrics(tmp_path / "one-bad")[-1]
    assert record["skipped_steps"] == 2
    final = read_checkpoint(tmp_path / "one-bad" / "checkpoints" / "step-0000008.pt")["model"]
    assert all(torch.isfinite(v).all() for v in final.values())

    latents[:] = np.nan
    data = write_features(tmp_path / "all-nan", latents, rng.integers(0, 10, 32), 10)
    proc = _train(None, tmp_path, "--max-steps", "20", "--max-nonfinite-steps", "3", data=data, prefix="all-bad",
                  check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "the training diverged: 3 consecutive steps had a non-finite loss" in proc.stderr
    assert "Check the data for NaN" in proc.stderr


def test_resuming_with_other_settings_is_refused(planted, tmp_path):
    _train(planted, tmp_path, "--max-steps", "2", "--ckpt-every", "1")
    proc = _train(planted, tmp_path, "--max-steps", "2", "--lr", "5e-4", check=False)
    assert proc.returncode == 2 and "lr: 0.0001 recorded, 0.0005 now" in proc.stderr
