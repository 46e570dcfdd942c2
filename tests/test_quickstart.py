"""quickstart.py end to end (--fast), and the benchmark scripts at their smallest sizes."""

import dataclasses
import json
import math
import os
import re
import resource

import pytest
import torch
from helpers import one_line_error, run_cli, tiny_dit

from pipelines.quickstart import (
    CLEAR_POOL,
    CLEAR_SEED_OFFSET,
    FAST,
    METHODS,
    WIDTH_METHODS,
    Quickstart,
    StepFailed,
    clear_attention,
)
from tinyfusion.checkpoint import load_model, read_checkpoint, save_model
from tinyfusion.errors import UserError


def test_quickstart_fast_runs_every_stage(tmp_path):
    out = tmp_path / "qs"
    proc = run_cli(["quickstart.py", "--fast", "--out", str(out)], timeout=900)
    assert "quickstart finished" in proc.stdout
    result = json.loads((out / "results.json").read_text())
    rows = {r["model"]: r for r in result["rows"]}
    methods = METHODS + WIDTH_METHODS
    assert len(rows) == 3 + len(methods) + 1  # floor, teacher, ceiling, each method + KD, learned + fine-tuning
    assert 0 < rows["real digits (other half)"]["fid_after"] < rows["teacher"]["fid_after"]  # the floor
    for name, row in rows.items():
        if name.startswith("real"):
            continue
        for key in ("params_m", "latency_ms", "speedup", "fid_after", "seconds"):
            assert math.isfinite(row[key]), (name, key)
        width = name.startswith("diff-pruning")
        assert row["depth"] == (8 if name.startswith("teacher") or width else 4)
        if name != "teacher":
            assert math.isfinite(row["fid_before"])
        # models of one architecture are timed once: the teacher's rows share its latency, the pruned ones theirs
        base = "teacher" if name.startswith("teacher") else name if width else "learned-1-2 + masked KD"
        assert row["latency_ms"] == rows[base]["latency_ms"], name
        assert row["speedup"] == pytest.approx(rows["teacher"]["latency_ms"] / row["latency_ms"], rel=1e-12), name
    assert rows["teacher"]["speedup"] == rows["teacher + recovery budget"]["speedup"] == 1.0
    assert rows["teacher"]["seconds"] == result["step_seconds"]["teacher"]
    assert rows["bi + masked KD"]["seconds"] == pytest.approx(result["step_seconds"]["prune-bi"]
                                                              + result["step_seconds"]["kd-bi"])
    assert result["feature_space"] == "digits-classifier"
    assert "FID after recovery (digits-classifier)" in (out / "results.md").read_text()
    # every stage left its artifacts
    width = rows["diff-pruning + masked KD"]
    assert width["kept"] == list(range(8)) and width["rank"] is None
    assert 0.5 < width["params_m"] / rows["teacher"]["params_m"] < 0.9  # the blocks' attention and MLP halved
    # the smoke run's Taylor loop ends at its own threshold, before the 1000 timesteps its young teacher would need
    log = (out / "logs" / "prune-diff-pruning.log").read_text()
    assert f"--taylor-threshold {FAST.taylor_threshold}" in log
    assert 0 < int(re.search(r"Taylor loop: (\d+) timesteps", log).group(1)) < 1000
    assert rows["teacher"]["latency_ms"] != width["latency_ms"]
    for method in methods:
        assert (out / "models" / f"{method}.pt").is_file() and (out / "models" / f"{method}+kd.pt").is_file()
        assert (out / "grids" / f"{method}.png").is_file() and (out / "grids" / f"{method}+kd.png").is_file()
    for name in ("teacher.pt", "teacher+train.pt", "learned-1-2+ft.pt"):
        assert (out / "models" / name).is_file()
    assert (out / "decisions-learned-1-2.png").is_file() and (out / "decisions-learned-4-8.png").is_file()
    # 17 models, and the teacher again with another sampling seed
    assert len(list((out / "samples").glob("*.npz"))) == 18 and (out / "classifier.pt").is_file()
    assert (out / "models" / "ablation-lora.pt").is_file()
    assert set(result["step_seconds"]) >= {"extract_features", "teacher", "evaluate", "latency"}
    # --fast runs one process per script and so as many scripts at a time as there are cores
    assert result["nproc"] == 1 and result["jobs"] == (os.cpu_count() or 1)
    assert result["launch"] == "fork"  # every step here is one process: each forked from a server of the run's
    # every step ran in this run, at most `jobs` at a time: the wall-clock time holds each, and their sum over jobs
    times = result["step_seconds"].values()
    assert result["wall_seconds"] >= max(times) and result["wall_seconds"] >= sum(times) / result["jobs"]
    assert (f"This run: {result['wall_seconds']:.0f} s wall-clock on cpu (fp32), 1 process(es) per script, "
            f"{result['jobs']} script(s) at a time") in (out / "results.md").read_text()
    assert result["fast"] and (out / "results.md").read_text().startswith("**Smoke run (--fast)")
    assert "mostly noise" in (out / "grids" / "SMOKE-RUN.txt").read_text()
    assert [a["name"] for a in result["ablation"]] == ["learned-1-2", "ablation-lora"]  # the full run: all four
    assert all(len(a["kept"]) == len(a["raw_kept"]) == 4 for a in result["ablation"])
    # every learned decision is made with FAST.decision_seeds seeds; the row's model is the first seed's
    assert set(result["seeds"]) == {"learned-1-2", "learned-4-8", "ablation-lora"}
    for name, entry in result["seeds"].items():
        made = entry["decisions"]
        assert [d["seed"] for d in made] == list(range(FAST.decision_seeds))
        assert entry["agree"] == all(d["kept"] == made[0]["kept"] for d in made)
        for d in made:
            assert len(d["kept"]) == 4 and 0 < d["confidence_min"] <= 1
            assert d["steps"] == (FAST.wide_prune_steps if name == "learned-4-8" else FAST.prune_steps)
            assert 0 < d["steps_run"] <= d["steps"]
        assert (out / "models" / f"{name}-seed1.pt").is_file()
    for method in ("learned-1-2", "learned-4-8"):
        assert rows[f"{method} + masked KD"]["kept"] == result["seeds"][method]["decisions"][0]["kept"]
    fids = result["teacher_fid_over_seeds"]
    assert len(fids) == FAST.fid_seeds and fids[0] == rows["teacher"]["fid_after"] and len(set(fids)) == FAST.fid_seeds
    report = (out / "results.md").read_text()
    assert f"made with {FAST.decision_seeds} seeds" in report
    assert f"The teacher's FID over {FAST.fid_seeds} sampling seeds: " + ", ".join(f"{v:.2f}" for v in fids) in report
    assert result["clear"] is None and not (out / "data" / "self-generated").exists()

    # --clear on the same folder: every finished step is reused; the CLEAR stage adds the teacher with local
    # attention (r = 2 on the 4x4 token grid of 8x8 digits in patches of 2), distilled on its own samples
    first = result["step_seconds"]
    run_cli(["quickstart.py", "--fast", "--clear", "--out", str(out)], timeout=600)
    result = json.loads((out / "results.json").read_text())
    rows = {r["model"]: r for r in result["rows"]}
    spec = {"kind": "local", "radius": 2, "pool": CLEAR_POOL}
    assert result["clear"]["grid"] == [4, 4] and result["clear"]["attention"] == spec
    clear = rows["CLEAR local r=2" + (f" + keys pooled {CLEAR_POOL}x{CLEAR_POOL}" if CLEAR_POOL > 1 else "")]
    assert clear["attention"] == spec and clear["depth"] == 8 and clear["params_m"] == rows["teacher"]["params_m"]
    for key in ("fid_before", "fid_after", "latency_ms", "seconds"):  # before: converted, not distilled
        assert math.isfinite(clear[key]) and clear[key] > 0, key
    assert clear["speedup"] == pytest.approx(rows["teacher"]["latency_ms"] / clear["latency_ms"], rel=1e-12)
    assert clear["seconds"] == pytest.approx(result["step_seconds"]["self-generated"]
                                             + result["step_seconds"]["clear-local-r2"])
    assert len(rows) == 3 + len(methods) + 2 and "| CLEAR local r=2" in (out / "results.md").read_text()
    # the self-generated feature set: FAST.clear_samples of the teacher's samples, from a seed no FID set uses
    index = json.loads((out / "data" / "self-generated" / "index.json").read_text())
    assert index["num_images"] == FAST.clear_samples and index["latent_shape"] == [3, 8, 8]
    assert index["source"]["global_seed"] == CLEAR_SEED_OFFSET
    # both files record local attention; the control keeps every weight of the teacher, and distillation changed
    # the attention layers (qkv and proj of the 8 blocks) alone
    teacher = load_model(out / "models" / "teacher.pt").model.state_dict()
    for name, changed in (("local-r2", set()), ("local-r2+clear", {f"blocks.{i}.attn.{layer}.{kind}" for i in range(8)
                                                                   for layer in ("qkv", "proj")
                                                                   for kind in ("weight", "bias")})):
        record = read_checkpoint(out / "models" / f"{name}.pt")
        assert record["config"]["attention"] == spec and record["extra"]["method"] == "clear", name
        state = load_model(out / "models" / f"{name}.pt").model.state_dict()
        assert {k for k in teacher if not torch.equal(teacher[k], state[k])} == changed, name
    assert (out / "grids" / "local-r2+clear.png").is_file() and len(list((out / "samples").glob("*.npz"))) == 20
    # the steps of the first run were reused (their times kept); scoring and timing run again over every model
    assert {k: v for k, v in result["step_seconds"].items() if k in first and k not in ("evaluate", "latency")} \
        == {k: v for k, v in first.items() if k not in ("evaluate", "latency")}
    assert set(result["step_seconds"]) - set(first) == {"self-generated", "convert-local-r2", "clear-local-r2",
                                                        "sample-local-r2", "sample-local-r2+clear"}
    assert json.loads((out / "quickstart.json").read_text())["clear"] == {"clear_samples": FAST.clear_samples}



def test_clear_radius_follows_the_token_grid():
    """A quarter of the grid's shorter side, at least 2 (the 3x3 neighbourhood)."""
    radii = {grid: clear_attention(grid)["radius"] for grid in [(4, 4), (8, 8), (16, 16), (32, 32), (32, 16)]}
    assert radii == {(4, 4): 2, (8, 8): 2, (16, 16): 4, (32, 32): 8, (32, 16): 4}


def test_clear_is_refused_for_mar_in_one_line(tmp_path):
    proc = run_cli(["quickstart.py", "--fast", "--family", "mar", "--clear", "--out", str(tmp_path / "qs")],
                   check=False)
    one_line_error(proc, 2, "--clear", "MAR", "DiT and SiT")
    assert not (tmp_path / "qs").exists()


def test_a_folder_takes_the_clear_stage_later_and_keeps_its_settings(tmp_path):
    def folder(budget=FAST, clear=False):
        Quickstart(tmp_path, budget, nproc=1, data_path=None, image_size=8, seed=0, clear=clear).check_folder()
        return json.loads((tmp_path / "quickstart.json").read_text())

    assert "clear" not in folder()  # a folder made without --clear (or before the stage existed)
    assert folder(clear=True)["clear"] == {"clear_samples": FAST.clear_samples}  # takes it, recorded
    assert folder()["clear"] == {"clear_samples": FAST.clear_samples}  # a run without --clear leaves it alone
    with pytest.raises(UserError, match="clear_samples"):
        folder(dataclasses.replace(FAST, clear_samples=2 * FAST.clear_samples), clear=True)


def test_fast_and_full_runs_have_their_own_folders():
    from pipelines.quickstart import default_out

    assert default_out("dit", fast=False) == "results/quickstart"
    assert default_out("dit", fast=True) == "results/quickstart-fast"
    assert default_out("sit", fast=False) == "results/quickstart-sit"
    assert default_out("mar", fast=True) == "results/quickstart-mar-fast"


def test_cuda_runs_every_step_on_the_gpu_in_bf16(tmp_path, monkeypatch):
    """--device cuda (what a GPU machine checks the CUDA paths with): each model-running script gets --device cuda,
    training and sampling run in bf16, and the distributed scripts go through torchrun even with one process, so the
    process group is NCCL's. The commands are checked here; they run on a GPU (see the README)."""
    from pipelines.quickstart import default_out

    with pytest.raises(UserError, match="no CUDA GPU is visible"):
        Quickstart(tmp_path, FAST, nproc=1, data_path=None, image_size=8, seed=0, device="cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    quickstart = Quickstart(tmp_path, FAST, nproc=1, data_path=None, image_size=8, seed=0, device="cuda")
    train = quickstart.command(["train.py", *quickstart._train_args("x", 1, 1e-4)], distributed=True)
    assert train[1:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1"]
    assert train[-2:] == ["--device", "cuda"] and train[train.index("--precision") + 1] == "bf16"
    sample = quickstart.command(quickstart._sampling_args(tmp_path / "m.pt", 8, 0, tmp_path / "s.npz"),
                                distributed=True)
    assert sample[-4:] == ["--precision", "bf16", "--device", "cuda"]
    cut = quickstart.command(["prune_by_index.py", "--ckpt", "m.pt"], distributed=False)
    assert cut[1:] == ["prune_by_index.py", "--ckpt", "m.pt"]  # a file operation: no device
    assert quickstart.settings()["device"] == "cuda"
    assert default_out("dit", True, "cuda") == "results/quickstart-fast-cuda"
    cpu = Quickstart(tmp_path / "cpu", FAST, nproc=1, data_path=None, image_size=8, seed=0)
    assert cpu.command(["train.py", "--lr", "1"], distributed=True)[1:] == ["train.py", "--lr", "1"]
    assert "device" not in cpu.settings()  # folders made on CPU stay valid


def test_mar_score_baselines_keep_half_of_each_stack(tmp_path):
    quickstart = Quickstart(tmp_path, FAST, nproc=1, data_path=None, image_size=8, seed=0, family="mar")
    assert quickstart.teacher_model == "MAR-Nano"
    quickstart.stacks, quickstart.depth = {"encoder": 4, "decoder": 4}, 8
    assert quickstart.half_depth() == ["encoder=2", "decoder=2"]
    quickstart.stacks, quickstart.depth = {"blocks": 8}, 8
    assert quickstart.half_depth() == ["4"]


@pytest.mark.parametrize("launch", ["fork", "spawn"])
def test_a_failing_step_stops_with_its_command_and_output(tmp_path, launch):
    """Forked from the run's server or started as a new process, a step's log holds its command line, then its
    output (standard error included), and a failure quotes both."""
    quickstart = Quickstart(tmp_path, FAST, nproc=1, data_path=None, image_size=8, seed=0, launch=launch)
    try:
        with pytest.raises(StepFailed) as info:
            quickstart.script("broken", ["evaluator.py", str(tmp_path / "missing.npz"), str(tmp_path / "x.npz")],
                              distributed=False)
    finally:
        quickstart.close()
    message = str(info.value)
    assert "step 'broken' failed (exit code 2)" in message and "evaluator.py" in message and "missing.npz" in message
    log = (tmp_path / "logs" / "broken.log").read_text().splitlines()
    assert log[0].startswith("$ ") and "evaluator.py" in log[0] and any("missing.npz" in line for line in log[1:])
    assert "broken" not in quickstart.times


def test_steps_keep_the_environment_the_run_started_with(tmp_path, monkeypatch):
    """scikit-learn adds KMP_* variables to os.environ when the run loads the digits: the steps forked after it still
    run in the environment of their server, the run's."""
    quickstart = Quickstart(tmp_path, FAST, nproc=1, data_path=None, image_size=8, seed=0, launch="fork")
    try:
        quickstart.script("first", ["evaluator.py", "--help"], distributed=False)
        monkeypatch.setenv("KMP_INIT_AT_FORK", "FALSE")
        quickstart.script("second", ["evaluator.py", "--help"], distributed=False)
    finally:
        quickstart.close()
    assert set(quickstart.times) == {"first", "second"}
    assert "usage: evaluator.py" in (tmp_path / "logs" / "second.log").read_text()


def test_an_existing_teacher_is_reused(tmp_path):
    teacher = tmp_path / "models" / "teacher.pt"
    save_model(teacher, tiny_dit())
    quickstart = Quickstart(tmp_path, FAST, nproc=1, data_path=None, image_size=8, seed=0)

    class Bar:
        def update(self, n):
            pass

        def set_postfix_str(self, s):
            pass

    quickstart._bar = Bar()
    assert quickstart.train_teacher() == teacher and quickstart.times == {}  # no script ran


def test_forward_benchmark_smallest(tmp_path):
    save_model(tmp_path / "pruned.pt", tiny_dit(depth=2, input_size=2))
    out = tmp_path / "forward.json"
    proc = run_cli(["-m", "benchmarks.forward", "--models", "DiT-Nano/2", str(tmp_path / "pruned.pt"),
                    "--image-size", "16", "--batch-sizes", "2", "--precisions", "fp32", "bf16", "--warmup", "0",
                    "--repeats", "1", "--num-sampling-steps", "2", "--peak-size", "64", "--device", "cpu", "--out",
                    str(out)])
    result = json.loads(out.read_text())
    assert len(result["forward"]) == 6 and len(result["sampling"]) == 4  # sampling in each precision too
    baseline, pruned = result["forward"][:2]
    assert baseline["speedup"] == 1.0 and baseline["ideal_speedup"] == 1.0
    assert pruned["ideal_speedup"] > 1.0 and pruned["depth"] == 2  # fewer FLOPs than DiT-Nano/2
    # bf16 on both paths: the sampling scripts' (weights held in bf16) and autocast's
    assert [(r["precision"], r["path"], r["batch"]) for r in result["forward"]] == (
        [("fp32", "fp32", 2)] * 2 + [("bf16", "held", 2)] * 2 + [("bf16", "autocast", 2)] * 2)
    for group in (result["forward"][:2], result["forward"][2:4], result["forward"][4:]):  # each its own baseline
        for r in group:
            assert r["speedup"] == pytest.approx(group[0]["latency_ms"] / r["latency_ms"], rel=1e-12)
            assert r["ideal_speedup"] == pytest.approx(group[0]["gflops"] / r["gflops"], rel=1e-12)
            assert r["images_per_s"] == pytest.approx(r["batch"] * 1e3 / r["latency_ms"], rel=1e-12)
    # on CPU the memory column is the process's RSS high-water mark: it only grows, in the order of the rows
    peaks = [r["peak_mib"] for r in result["forward"]]
    assert all(r["memory"] == "process peak RSS" for r in result["forward"]) and peaks == sorted(peaks)
    assert [(r["precision"], r["batch"], r["steps"]) for r in result["sampling"]] == [("fp32", 2, 2)] * 2 + [
        ("bf16", 2, 2)] * 2
    assert all(r["images_per_s"] == pytest.approx(2 / r["seconds"], rel=1e-12) for r in result["sampling"])
    # end to end, as sample.py: decoded by the codec the 4 latent channels name (random weights for the benchmark)
    assert {r["decoder"] for r in result["sampling"]} == {"sd-vae (random weights)"}
    assert "| model | depth |" in proc.stdout


def test_mar_speed_benchmark_smallest(tmp_path):
    out = tmp_path / "mar.json"
    proc = run_cli(["-m", "benchmarks.mar_speed", "--model", "MAR-Nano", "--image-size", "8", "--batch-size", "2",
                    "--num-iter", "2", "--num-sampling-steps", "2", "--warmup", "0", "--repeats", "1", "--device",
                    "cpu", "--out", str(out)])
    result = json.loads(out.read_text())
    full, pruned = result["forward"]
    assert (full["depth"], pruned["depth"]) == (8, 4) and pruned["ideal_speedup"] > 1.3
    assert [r["sampler"] for r in result["sampling"]] == ["mar", "mar"]
    assert [(r["num_iter"], r["steps"], r["batch"]) for r in result["sampling"]] == [(2, 2, 2)] * 2
    speedup = result["sampling"][0]["seconds"] / result["sampling"][1]["seconds"]  # the full model's over the pruned
    assert result["sampling_speedup"] == pytest.approx(speedup, rel=1e-12)
    assert f"sampling speedup {speedup:.2f}x at 2 iterations" in proc.stdout


def test_training_benchmark_smallest(tmp_path):
    out = tmp_path / "training.json"
    run_cli(["-m", "benchmarks.training", "--model", "DiT-Nano/2", "--image-size", "16", "--batch-size", "4",
             "--warmup", "0", "--repeats", "1", "--device", "cpu", "--out", str(out)])
    result = json.loads(out.read_text())
    rows = {r["task"]: r for r in result["rows"]}
    assert set(rows) == {"train", "kd", "prune-lora", "prune-full"}
    assert 0 < rows["kd"]["teacher_share"] < 1
    for task in ("prune-lora", "prune-full"):  # the step's cost relative to plain training of the same model
        assert rows[task]["vs_train"] == pytest.approx(rows[task]["seconds_per_step"]
                                                       / rows["train"]["seconds_per_step"], rel=1e-12)
    for row in rows.values():
        assert row["images_per_s"] == pytest.approx(4 * row["steps_per_s"], rel=1e-12)  # batch 4
    assert 0 < result["lora_trainable_fraction"] < 1
    # --tasks: a pruning task brings its reference, the train step
    run_cli(["-m", "benchmarks.training", "--model", "DiT-Nano/2", "--image-size", "16", "--batch-size", "4",
             "--warmup", "0", "--repeats", "1", "--device", "cpu", "--tasks", "prune-lora", "--out", str(out)])
    assert [r["task"] for r in json.loads(out.read_text())["rows"]] == ["train", "prune-lora"]


def test_benchmarked_calls_take_turns():
    """Models of one setting are timed in turns (A B A B ...), after each one's warm-up calls."""
    import torch

    from benchmarks.harness import time_interleaved

    calls = []
    fns = [lambda: calls.append("a"), lambda: calls.append("b")]
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    results = time_interleaved(fns, torch.device("cpu"), warmup=1, repeats=3)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    assert calls == ["a", "b", "a", "b", "a", "b", "a", "b"]
    assert [len(times) for times, _ in results] == [3, 3]
    assert all(0 < t < 1 for times, _ in results for t in times)  # each a measured duration of a trivial call
    # on CPU: the process's RSS high-water mark in MiB when each was last timed (b after a)
    (_, a), (_, b) = results
    assert a["memory"] == b["memory"] == "process peak RSS"
    assert before <= a["peak_mib"] <= b["peak_mib"] <= after
