"""Pruning through the real CLIs: learned (TinyFusion), by score and by index."""

import json

import pytest
import torch
from helpers import interrupt_with_sigterm, run_cli, tiny_dit
from helpers.tolerance import assert_fp32_close

from models import DiT, prune_depth
from tinyfusion.checkpoint import load_model, read_checkpoint, save_model
from tinyfusion.pruning import (
    block_influence,
    first_k_indices,
    kept_from_pruned,
    linear_anneal,
    oracle_indices,
    read_decision_history,
    select_kept,
)


def _learn(planted, tmp_path, *extra, nproc=1, prefix="run", ema=("--ema-decay", "0.8")):
    out = tmp_path / f"{prefix}.pt"
    run_cli(["prune_by_learning.py", "--load-weight", str(planted["ckpt"]), "--groups", "3x1:2",
             "--data-path", str(planted["data"]), "--results-dir", str(tmp_path), "--prefix", prefix,
             "--max-steps", "24", "--global-batch-size", "16", "--log-every", "4", "--num-workers", "0",
             *ema, "--delta-w", "--lora", "--lora-rank", "2", "--save-model", str(out), *extra],
            nproc=nproc)
    return out, tmp_path / prefix


def test_the_default_gate_ema_fits_the_run_and_its_decision_is_the_raw_gates(planted, tmp_path):
    from tinyfusion.pruning import gate_ema_decay

    assert gate_ema_decay(500) == pytest.approx(0.98) and gate_ema_decay(10_000) == pytest.approx(0.999)
    assert gate_ema_decay(5) == 0.0 and gate_ema_decay(10 ** 7) == 0.9999
    _, run_dir = _learn(planted, tmp_path, ema=())
    decision = json.loads((run_dir / "decisions.json").read_text())
    assert decision["ema_decay"] == pytest.approx(1 - 1 / 2.4)  # a window of 10% of 24 steps
    assert decision["kept_indices"] == decision["raw_kept_indices"] == planted["essential"]
    history = [json.loads(line) for line in (run_dir / "decisions.jsonl").read_text().splitlines()]
    assert all({"kept_indices", "raw_kept_indices", "raw_confidence"} <= set(h) for h in history)


def test_a_confident_decision_ends_the_run_early_and_a_rerun_keeps_it(planted, tmp_path):
    args = ("--max-steps", "200", "--stop-at-confidence", "0.9")
    out, run_dir = _learn(planted, tmp_path, *args)
    decision = json.loads((run_dir / "decisions.json").read_text())
    history = [json.loads(line) for line in (run_dir / "decisions.jsonl").read_text().splitlines()]
    assert decision["steps"] == 200 and decision["steps_run"] < 200 and decision["steps_run"] % 4 == 0
    assert "at least 0.9" in decision["ended_early"] and min(decision["confidence"]) >= 0.9
    assert decision["kept_indices"] == decision["raw_kept_indices"] == planted["essential"]
    assert history[-1]["step"] == decision["steps_run"]  # it stopped at the first log step that was confident
    assert all(min(h["confidence"]) < 0.9 or h["kept_indices"] != h["raw_kept_indices"] for h in history[:-1])
    kept = load_model(out).lineage["kept_indices"]
    out.unlink()
    out, _ = _learn(planted, tmp_path, *args)  # the same command again: the run is complete, not continued
    assert load_model(out).lineage["kept_indices"] == kept == planted["essential"]
    again = [json.loads(line) for line in (run_dir / "decisions.jsonl").read_text().splitlines()]
    assert again == history and "it ended early" in (run_dir / "log.txt").read_text()


def test_learned_pruning_finds_the_planted_answer_and_discards_the_updates(planted, tmp_path):
    out, run_dir = _learn(planted, tmp_path)
    decision = json.loads((run_dir / "decisions.json").read_text())
    assert decision["kept_indices"] == planted["essential"]
    assert min(decision["confidence"]) > 0.9
    from PIL import Image

    assert Image.open(run_dir / "decisions.png").size == (960, 720)  # the 8 x 6 inch figure at 120 dpi
    history = [json.loads(line) for line in (run_dir / "decisions.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history] == [4, 8, 12, 16, 20, 24]

    pruned = load_model(out)  # no --model: the file describes itself
    assert pruned.config["depth"] == 3 and pruned.lineage["kept_indices"] == planted["essential"]
    assert pruned.lineage["method"] == "learned"
    original = planted["model"]
    for i, k in enumerate(planted["essential"]):  # bit-identical to the original blocks: updates discarded
        for (name, a), b in zip(pruned.model.blocks[i].state_dict().items(), original.blocks[k].state_dict().values()):
            assert torch.equal(a, b), name
    assert torch.equal(pruned.model.final_layer.linear.weight, original.final_layer.linear.weight)


def test_learned_pruning_is_the_same_on_one_and_two_processes(planted, tmp_path):
    _, one = _learn(planted, tmp_path, prefix="one")
    _, two = _learn(planted, tmp_path, prefix="two", nproc=2)
    d1, d2 = (json.loads((r / "decisions.json").read_text()) for r in (one, two))
    assert d1["kept_indices"] == d2["kept_indices"]
    assert d1["confidence"] == pytest.approx(d2["confidence"], abs=1e-5)
    m1, m2 = ([json.loads(line) for line in (r / "metrics.jsonl").read_text().splitlines()] for r in (one, two))
    assert [m["loss"] for m in m1] == pytest.approx([m["loss"] for m in m2], rel=1e-5)


def test_an_interrupted_and_resumed_run_ends_with_the_same_gates(planted, tmp_path):
    _learn(planted, tmp_path, "--log-every", "1", prefix="straight")
    args = ["prune_by_learning.py", "--load-weight", str(planted["ckpt"]), "--groups", "3x1:2", "--data-path",
            str(planted["data"]), "--results-dir", str(tmp_path), "--prefix", "resumed", "--max-steps", "24",
            "--global-batch-size", "16", "--log-every", "1", "--num-workers", "0", "--ema-decay", "0.8", "--delta-w",
            "--lora", "--lora-rank", "2", "--save-model", str(tmp_path / "resumed.pt")]
    interrupt_with_sigterm(args, tmp_path / "resumed" / "metrics.jsonl", after_lines=5)
    assert not (tmp_path / "resumed.pt").exists()
    run_cli(args)
    straight, resumed = (read_checkpoint(tmp_path / p / "checkpoints" / "step-0000024.pt") for p in ("straight",
                                                                                                     "resumed"))
    for key in straight["model"]:  # gates, LoRA and weights: the same numbers
        assert torch.equal(straight["model"][key], resumed["model"][key]), key
    assert json.loads((tmp_path / "straight" / "decisions.json").read_text())["kept_indices"] == \
        json.loads((tmp_path / "resumed" / "decisions.json").read_text())["kept_indices"]
    history = read_decision_history(tmp_path / "resumed" / "decisions.jsonl")
    assert [h["step"] for h in history] == list(range(1, 25))  # steps redone after the stop are logged once


def test_gates_that_do_not_cover_the_model_are_refused(planted, tmp_path):
    proc = run_cli(["prune_by_learning.py", "--load-weight", str(planted["ckpt"]), "--groups", "2x1:2",
                    "--data-path", str(planted["data"]), "--results-dir", str(tmp_path), "--max-steps", "1",
                    "--save-model", str(tmp_path / "x.pt")], check=False)
    assert proc.returncode == 2 and "cover 4 blocks but the model has 6" in proc.stderr


def test_a_data_path_without_features_is_refused(planted, tmp_path):
    proc = run_cli(["prune_by_learning.py", "--load-weight", str(planted["ckpt"]), "--groups", "3x1:2",
                    "--data-path", str(tmp_path), "--max-steps", "1", "--save-model", str(tmp_path / "x.pt")],
                   check=False)
    assert proc.returncode == 2 and "no features at" in proc.stderr


def test_bi_scores_reproduce_the_reference(reference):
    e = reference["expected"]
    model = load_model(reference["ckpt"], "DiT", num_heads=4).model
    sums, count = block_influence(model, [(e["x"], e["t"], e["y"])])
    # 1 - cos keeps the absolute precision of the cosine (magnitude 1): compare cosines (helpers/tolerance.py).
    assert_fp32_close(1 - (sums / count).float(), 1 - e["bi_score_1_minus_cos"])


def test_prune_by_score_cli_bi_and_loss(planted, tmp_path):
    for criterion in ("bi", "loss"):
        out = tmp_path / f"{criterion}.pt"
        run_cli(["prune_by_score.py", "--ckpt", str(planted["ckpt"]), "--data-path", str(planted["data"]),
                 "--criterion", criterion, "--n-pruned", "3", "--num-batches", "2", "--batch-size", "16",
                 "--save-model", str(out)])
        scores = json.loads(out.with_suffix(".scores.json").read_text())
        # identity blocks have no influence and cost nothing to remove: they rank first, exactly 0
        assert all(scores["scores"][i] == pytest.approx(0.0, abs=1e-6) for i in (1, 2, 5))
        assert scores["kept_indices"] == planted["essential"]
        assert load_model(out).lineage["method"] == f"score-{criterion}"


def test_loss_scores_are_the_same_on_two_processes(planted, tmp_path):
    outs = []
    for nproc in (1, 2):
        out = tmp_path / f"loss{nproc}.pt"
        run_cli(["prune_by_score.py", "--ckpt", str(planted["ckpt"]), "--data-path", str(planted["data"]),
                 "--criterion", "loss", "--target-depth", "4", "--num-batches", "2", "--batch-size", "8",
                 "--save-model", str(out)], nproc=nproc)
        outs.append(json.loads(out.with_suffix(".scores.json").read_text()))
    assert outs[0]["scores"] == pytest.approx(outs[1]["scores"], abs=1e-5)
    assert outs[0]["num_samples"] == outs[1]["num_samples"] == 16


def test_random_criterion_is_seeded_and_protection_is_explicit(planted, tmp_path):
    runs = []
    for seed in (1, 1):
        out = tmp_path / f"r{len(runs)}.pt"
        run_cli(["prune_by_score.py", "--ckpt", str(planted["ckpt"]), "--criterion", "random", "--n-pruned", "2",
                 "--global-seed", str(seed), "--protect-first", "1", "--save-model", str(out)])
        runs.append(json.loads(out.with_suffix(".scores.json").read_text())["kept_indices"])
    assert runs[0] == runs[1] and all(0 in r for r in runs)
    proc = run_cli(["prune_by_score.py", "--ckpt", str(planted["ckpt"]), "--criterion", "random", "--n-pruned", "5",
                    "--protect-first", "1", "--protect-last", "1", "--save-model", str(tmp_path / "x.pt")], check=False)
    assert proc.returncode == 2 and "cannot prune 5 of 6 blocks" in proc.stderr


def test_select_kept():
    assert select_kept([0.5, 0.1, 0.3, 0.2], 2) == [0, 2]
    assert select_kept([0.5, 0.1, 0.3, 0.2], 2, protect_first=0, protect_last=1) == [0, 3]
    with pytest.raises(ValueError, match="cannot prune"):
        select_kept([1, 2, 3], 3)


def test_prune_by_index_reproduces_the_reference(reference, tmp_path):
    e = reference["expected"]
    out = tmp_path / "pruned.pt"
    run_cli(["prune_by_index.py", "--ckpt", str(reference["ckpt"]), "--model", "DiT", "--num-heads", "4",
             "--kept-indices", "[0,", "2]", "--save-model", str(out)])
    model = load_model(out).model
    with torch.no_grad():
        assert_fp32_close(model(e["x"], e["t"], e["y"]), e["pruned_forward"])


@pytest.mark.parametrize("args, kept", [
    (["--kept-indices", "0", "2", "3"], [0, 2, 3]),
    (["--kept-indices", "[3, 1]"], [1, 3]),
    (["--pruned-indices", "1", "3"], [0, 2]),
    (["--preset", "oracle"], [0, 3]),
    (["--preset", "first-k", "--target-depth", "3"], [0, 1, 2]),
])
def test_prune_by_index_forms(tmp_path, args, kept):
    save_model(tmp_path / "m.pt", tiny_dit(depth=4))
    run_cli(["prune_by_index.py", "--ckpt", str(tmp_path / "m.pt"), *args, "--save-model", str(tmp_path / "p.pt")])
    assert load_model(tmp_path / "p.pt").lineage["kept_indices"] == kept


@pytest.mark.parametrize("args, message", [
    (["--kept-indices", "0", "9"], "out of range"),
    (["--kept-indices", "1", "1"], "more than once"),
    (["--kept-indices", "a"], "is not a block index"),
    (["--preset", "first-k"], "needs --target-depth"),
])
def test_prune_by_index_errors(tmp_path, args, message):
    save_model(tmp_path / "m.pt", tiny_dit(depth=4))
    proc = run_cli(["prune_by_index.py", "--ckpt", str(tmp_path / "m.pt"), *args, "--save-model",
                    str(tmp_path / "p.pt")], check=False)
    assert proc.returncode == 2 and message in proc.stderr


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    proc = run_cli(["prune_by_index.py", "--ckpt", str(tmp_path / "none.pt"), "--preset", "oracle",
                    "--save-model", str(tmp_path / "p.pt")], check=False)
    assert proc.returncode == 2 and "does not exist" in proc.stderr


def test_index_presets():
    assert oracle_indices(28) == [0, 2, 4, 6, 8, 10, 12, 15, 17, 19, 21, 23, 25, 27]
    assert oracle_indices(4) == [0, 3]
    assert first_k_indices(5, 2) == [0, 1]
    assert kept_from_pruned([0, 4], 5) == [1, 2, 3]
    assert linear_anneal(4.0, 0.1, 0, 10) == 4.0 and linear_anneal(4.0, 0.1, 9, 10) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="even depth"):
        oracle_indices(7)


def test_depth_surgery_keeps_blocks_bit_identical():
    model = tiny_dit(depth=4)
    pruned = prune_depth(model, [3, 1])
    assert isinstance(pruned, DiT) and pruned.config["depth"] == 2
    assert torch.equal(pruned.blocks[0].attn.qkv.weight, model.blocks[1].attn.qkv.weight)
    assert torch.equal(pruned.blocks[1].mlp.fc2.bias, model.blocks[3].mlp.fc2.bias)
    assert len(model.blocks) == 4  # the source is untouched
