"""FID against function evaluations (benchmarks.nfe): every process's sweep makes the evaluations it plans, and the
benchmark's command line scores a teacher and a student as sample_ddp.py and evaluator.py would."""

import json
import math

import numpy as np
import pytest
import torch
from helpers import one_line_error, run_cli, tiny_dit, tiny_mar, tiny_sit

from models import prune_depth
from processes import create_process
from tinyfusion.checkpoint import save_model
from tinyfusion.evaluation import SmallClassifier, save_feature_extractor
from tinyfusion.sampling import SamplingSpec, image_seeds, sample_latents


def _sweep_counts(model, evaluations):
    inner = model.eval()
    process = create_process(type(inner).default_process(inner.config))
    points = process.evaluation_sweep(evaluations, inner.data_shape)
    counted = []
    for point in points:
        spec = SamplingSpec.for_process(process, sampler=point.sampler, num_steps=point.num_steps,
                                        options=point.options, data_shape=inner.data_shape, cfg_scale=2.0)
        sample_latents(inner, process, torch.tensor([1, 2]), image_seeds(0, range(2)), spec)
        counted.append((point, process.last_nfe.tolist()))
    return counted


@pytest.mark.parametrize("family", ["dit", "sit"])
def test_every_sweep_point_makes_the_evaluations_it_plans(family):
    model = {"dit": tiny_dit, "sit": tiny_sit}[family](depth=2)
    counted = _sweep_counts(model, [3, 6])
    names = {point.name.split(" ")[0] for point, _ in counted}
    expected = ({"ddpm", "ddim", "dpm++", "dpm++-sde", "unipc", "euler-a", "ddim-hf"} if family == "dit"
                else {"ode-euler", "ode-heun", "sde-euler", "sde-heun", "ode-dopri5"})
    assert names == expected
    for point, nfe in counted:
        if point.evaluations is None:  # dopri5: counted per image, at least one step of its 6 stages
            assert min(nfe) >= 6, point
        else:
            # a guided call (conditional and null rows together) counts once; Heun's grids round to even counts
            assert nfe == [point.evaluations] * 2, point
            assert abs(point.evaluations - (3 if point.evaluations <= 4 else 6)) <= 1, point


def test_mar_sweeps_its_iterations_up_to_one_per_token():
    counted = _sweep_counts(tiny_mar(), [2, 10, 250])  # 16 tokens: 250 iterations become 16
    assert [(p.options["num_iter"], nfe) for p, nfe in counted] == [(2, [2, 2]), (10, [10, 10]), (16, [16, 16])]
    assert all(p.num_steps is None for p, _ in counted)  # the head's steps stay the process's


def _pixel_pair(tmp_path):
    """A tiny pixel-space DiT teacher (8x8 RGB), a student with half its blocks, a reference set and a classifier
    feature space, as files."""
    teacher = tiny_dit(in_channels=3, depth=4)
    student = prune_depth(teacher, [0, 2])
    record = {"vae": "none", "scaling_factor": 1.0}
    save_model(tmp_path / "teacher.pt", teacher, codec=record)
    save_model(tmp_path / "student.pt", student, codec=record)
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "ref.npz", arr_0=rng.integers(0, 256, (64, 8, 8, 3), dtype=np.uint8))
    torch.manual_seed(0)
    save_feature_extractor(tmp_path / "fx.pt", SmallClassifier(8, 10, width=8), name="toy-space")
    return tmp_path / "teacher.pt", tmp_path / "student.pt", tmp_path / "ref.npz", tmp_path / "fx.pt"


def test_benchmark_scores_teacher_and_student_through_its_command_line(tmp_path):
    teacher, student, ref, fx = _pixel_pair(tmp_path)
    out = tmp_path / "nfe"
    proc = run_cli(["-m", "benchmarks.nfe", "--models", f"teacher={teacher}", f"half={student}", "--ref", str(ref),
                    "--feature-extractor", str(fx), "--num-samples", "24", "--cfg-scale", "2", "--evaluations", "4",
                    "8", "--target-evaluations", "4", "--samplers", "ddim", "dpm++", "--student-samplers", "ddim",
                    "dpm++", "--student-evaluations", "4", "--batch-size", "16",
                    "--repeats", "1", "--device", "cpu", "--out", str(out)])
    result = json.loads(out.with_suffix(".json").read_text())
    rows = result["rows"]
    assert [(r["model"], r["sampler"], r["planned_nfe"]) for r in rows] == [
        ("teacher", "ddim", 4), ("teacher", "ddim", 8), ("teacher", "dpm++", 4), ("teacher", "dpm++", 8),
        ("teacher", "ddpm (default)", None),
        ("half", "ddim", 4), ("half", "dpm++", 4)]  # the students at the counts and settings given them
    for r in rows:
        assert r["nfe"] == (250 if r["planned_nfe"] is None else r["planned_nfe"])  # counted while sampling
        assert math.isfinite(r["fid"]) and r["fid"] > 0 and r["images_per_s"] > 0
    head = result["headline"]
    assert head["baseline"]["sampler"] == "ddpm (default)" and head["baseline"]["steps"] == 250
    students = [r for r in rows if r["model"] == "half" and r["planned_nfe"] == 4]
    within = [r for r in students if r["fid"] <= head["fid_limit"]]
    expected = max(within, key=lambda r: r["images_per_s"]) if within else min(students, key=lambda r: r["fid"])
    assert (head["student"]["model"], head["student"]["sampler"]) == ("half", expected["sampler"])
    assert head["fid_within"] == bool(within)
    assert head["teacher_at_target"]["model"] == "teacher"
    timed = result["side_by_side"]
    assert [t["model"] for t in timed] == ["teacher", "teacher", "half"]
    # 250 evaluations against 4: the side-by-side timing sees the steps
    assert timed[2]["images_per_s"] > 5 * timed[0]["images_per_s"]
    text = proc.stdout
    assert "best student at 4 evaluations: half" in text and "| model | sampler | ~4 | ~8 |" in text
    assert out.with_suffix(".png").stat().st_size > 10_000
    assert "toy-space" in out.with_suffix(".md").read_text()

    # The teacher's ddim row is the FID that sample_ddp.py and evaluator.py give for the same settings.
    npz = tmp_path / "ddim.npz"
    run_cli(["sample_ddp.py", "--ckpt", str(teacher), "--vae", "none", "--num-fid-samples", "24",
             "--per-proc-batch-size", "16", "--sampler", "ddim", "--num-sampling-steps", "4", "--cfg-scale", "2",
             "--global-seed", "0", "--sample-dir", str(tmp_path / "parts"), "--npz", str(npz)])
    scored = tmp_path / "fid.json"
    run_cli(["evaluator.py", str(ref), str(npz), "--feature-extractor", str(fx), "--fid-method", "eigvals",
             "--out", str(scored), "--device", "cpu"])
    fid = json.loads(scored.read_text())["metrics"]["fid"]
    # the same images (same seeds, labels, batches), features and formula: equal up to float summation order
    assert rows[0]["fid"] == pytest.approx(fid, rel=1e-6)


def test_bad_inputs_are_one_line(tmp_path):
    teacher, _, ref, fx = _pixel_pair(tmp_path)
    proc = run_cli(["-m", "benchmarks.nfe", "--quickstart", str(tmp_path / "missing")], check=False)
    one_line_error(proc, 2, "--quickstart", "run quickstart.py first")
    proc = run_cli(["-m", "benchmarks.nfe", "--models", str(teacher), "--ref", str(ref), "--feature-extractor",
                    str(fx), "--samplers", "heun", "--device", "cpu"], check=False)
    one_line_error(proc, 2, "--samplers heun", "ddpm")
    proc = run_cli(["-m", "benchmarks.nfe", "--models", str(teacher), "--device", "cpu"], check=False)
    one_line_error(proc, 2, "--ref")


def test_odd_grids_count_for_the_evaluations_they_were_swept_for():
    """Heun's grids give 24 evaluations for about 25 and the SDE's Heun 9 for about 10: their rows sit in those
    columns and compete in the headline at 25 (they were left out of both when matched on the exact count)."""
    from benchmarks.nfe import asked_count, headline, pivot
    from processes.base import SweepPoint

    assert [asked_count(SweepPoint("x", "ode", 1, {}, n), [10, 25, 50]) for n in (9, 11, 24, 26, 49, 37)] == [
        10, 10, 25, 25, 50, 25]
    assert asked_count(SweepPoint("x", "ode", 1, {}, None), [10, 25]) is None

    def row(model, sampler, planned, fid, speed, role="student"):
        return {"model": model, "role": role, "sampler": sampler, "planned_nfe": planned, "nfe": planned or 73,
                "fid": fid, "images_per_s": speed, "asked": asked_count(SweepPoint("x", "ode", 1, {}, planned),
                                                                        [10, 25])}

    rows = [row("teacher", "ode-heun", 24, 2.5, 30, "teacher"), row("teacher", "sde-heun", 9, 37.4, 50, "teacher"),
            row("s", "ode-euler", 25, 1.98, 52), row("s", "ode-heun", 24, 1.90, 58)]
    table = pivot(rows, [10, 25])
    assert "| teacher | ode-heun |  | 2.50 (30) at NFE 24 |" in table
    assert "| teacher | sde-heun | 37.40 (50) at NFE 9 |  |" in table
    baseline = row("teacher", "ode-dopri5 (default)", None, 2.76, 2.4, "teacher")
    head = headline(rows, baseline, 25, 0.10)
    assert head["student"]["sampler"] == "ode-heun" and head["teacher_at_target"]["sampler"] == "ode-heun"
