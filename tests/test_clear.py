"""CLEAR (issue 22) through the real scripts, on a pixel-space tiny DiT (3 x 8 x 8 images, 2 x 2 patches: a 4 x 4
token grid): the teacher's own samples (sample_ddp.py --save-latents) distil a local student (train_masked_kd.py
--attention local) from a bare teacher; the student samples with no flags; only its attention weights move; the
run resumes to the same file; pruned students distil with their lineage's layer map and local models keep their
kind through every pruning script; a SiT distils too; the refusals are one line each."""

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from helpers import fit_tiny, one_line_error, run_cli, tiny_dit, tiny_mar, tiny_sit
from helpers.tolerance import LOOP_REL, assert_fp32_close
from PIL import Image

from models.attention import attention_modules
from processes import create_process
from tinyfusion.checkpoint import load_model, save_model
from tinyfusion.features import FeatureDataset
from tinyfusion.kd import check_method_flags
from tinyfusion.options import MaskedKDOptions
from tinyfusion.sampling import SamplingSpec, image_seeds, load_for_sampling, sample_latents
from tinyfusion.synthetic import class_pattern_latents

# On a 4 x 4 grid the farthest tokens are sqrt(3^2 + 3^2) = 4.24 apart: a radius of 5 reaches every token, so the
# local model computes global attention; a radius of 1 leaves each token only itself.
FULL, SELF = 5, 1
N, STEPS, SEED = 16, 5, 3
BARE = ["--model", "DiT", "--num-heads", "2"]  # a bare state dict fits DiT and SiT: the flags name one
LOCAL_FULL = {"kind": "local", "radius": FULL, "pool": 1}
LOCAL_SELF = {"kind": "local", "radius": SELF, "pool": 1}
LOCAL_POOLED = {"kind": "local", "radius": 2, "pool": 2}


def _is_attention(name: str) -> bool:
    """What CLEAR trains: blocks.*.attn.qkv.* and blocks.*.attn.proj.*."""
    parts = name.split(".")
    return parts[0] == "blocks" and parts[2:4] in (["attn", "qkv"], ["attn", "proj"])


def run_all(*commands, check=True):
    """Runs independent scripts two at a time (the tests' two cores); their processes, in order."""
    with ThreadPoolExecutor(2) as pool:
        return list(pool.map(lambda args: run_cli(args, check=check), commands))


def output(proc) -> str:
    return proc.stdout + proc.stderr


def kd(root, prefix, student, *extra, out=None):
    """train_masked_kd.py from the bare teacher on the teacher's own samples (in `root`): 2 steps of 8 images, the run
    in `out`/runs/`prefix` and the model in `out`/`prefix`.pt (`out`: default `root`)."""
    out = out or root
    return ["train_masked_kd.py", "--load-weight", *student, "--load-teacher", str(root / "teacher.pt"),
            "--teacher", "DiT", "--teacher-num-heads", "2", "--data-path", str(root / "latents"),
            "--results-dir", str(out / "runs"), "--prefix", prefix, "--global-batch-size", "8", "--num-workers",
            "0", "--max-steps", "2", "--log-every", "1", "--device", "cpu", "--save-model", str(out / f"{prefix}.pt"),
            *extra]


def sample(root, ckpt, name, *flags):
    return ["sample.py", "--ckpt", str(ckpt), *flags, "--num-sampling-steps", str(STEPS), "--seed", str(SEED),
            "--device", "cpu", "--out", str(root / f"{name}.png")]


def grid(root, name) -> np.ndarray:
    return np.asarray(Image.open(root / f"{name}.png").convert("RGB")).astype(np.int16)


@pytest.fixture(scope="module")
def clear(tmp_path_factory):
    """A teacher (bare state dict, depth 4) fitted to class patterns; its 16 samples as latents; two CLEAR
    students from it: "full" (radius 5, --lr 0) and "self" (radius 1, --lr 1e-2); sample.py grids of the teacher
    (no --attention, and --attention local --attention-radius 1) and of both students (no flags)."""
    root = tmp_path_factory.mktemp("clear")
    teacher = tiny_dit(in_channels=3, depth=4, randomize=False)
    fit_tiny(teacher, *class_pattern_latents(128, (3, 8, 8)), 40)  # briefly fitted, as a teacher is
    torch.save(teacher.state_dict(), root / "teacher.pt")  # the official layout
    teacher_path = str(root / "teacher.pt")
    run_cli(["sample_ddp.py", "--ckpt", teacher_path, *BARE, "--num-sampling-steps", str(STEPS), "--device", "cpu",
             "--num-fid-samples", str(N), "--per-proc-batch-size", "8", "--global-seed", "1", "--sample-dir",
             str(root / "samples"), "--save-latents", str(root / "latents")])
    bare = [teacher_path, *BARE]
    commands = {
        "full": kd(root, "full", bare, "--lr", "0", "--attention", "local", "--attention-radius", str(FULL)),
        "self": kd(root, "self", bare, "--lr", "1e-2", "--attention", "local", "--attention-radius", str(SELF)),
    }
    procs = dict(zip(commands, run_all(*commands.values())))
    grids = {"teacher": sample(root, teacher_path, "teacher", *BARE),
             "teacher-local": sample(root, teacher_path, "teacher-local", *BARE, "--attention", "local",
                                     "--attention-radius", str(SELF)),
             "full-student": sample(root, root / "full.pt", "full-student"),
             "self-student": sample(root, root / "self.pt", "self-student")}
    procs.update(zip(grids, run_all(*grids.values())))
    return {"root": root, "teacher": teacher.state_dict(), "procs": procs, "commands": commands}


#################################################################################
#             Self-generated data -> CLEAR student -> sample.py (no flags)      #
#################################################################################

def test_a_student_distilled_on_the_teachers_samples_samples_like_it_at_full_radius(clear):
    root, procs = clear["root"], clear["procs"]
    data = FeatureDataset(root / "latents")
    assert (len(data), data.latent_shape, data.num_classes) == (N, (3, 8, 8), 10)
    assert data.index.source["vae"] == "none"  # the teacher's own samples, in pixels
    for name, kind in (("full", LOCAL_FULL), ("self", LOCAL_SELF)):
        student = load_model(root / f"{name}.pt")  # no flags: the file describes its model
        assert (student.arch, student.config["attention"], student.lineage) == ("DiT", kind, None), name
        assert student.codec == {"vae": "none", "scaling_factor": 1.0}  # the codec of the data it met
        assert all(m.kind == kind for m in attention_modules(student.model))
        assert f"local r={kind['radius']}" in output(procs[f"{name}-student"])
        assert f"from {root / f'{name}.pt'}" in output(procs[f"{name}-student"])  # sample.py names the file
    assert "attention: global" in output(procs["teacher"])

    # Same weights (--lr 0) and a radius that reaches every token: the local attention is the global one, computed
    # by another kernel (a masked SDPA against an unmasked one), so the samples agree to float32 rounding, not
    # necessarily bit for bit. The PNGs quantize them: a value within rounding of a level boundary may land one
    # level off, which is rare; anything else fails.
    teacher, full = grid(root, "teacher"), grid(root, "full-student")
    assert np.abs(full - teacher).max() <= 1 and (full != teacher).mean() < 0.01
    # The floats before quantizing, through the same 5 steps and guidance: equal up to a sampling loop's rounding.
    assert_fp32_close(_samples(root / "full.pt"), _samples(root / "teacher.pt", model_name="DiT", num_heads=2),
                      rel=LOOP_REL)

    # Radius 1 (each token sees only itself): other images (measured ~30 of 255 levels apart on average, against
    # the full radius's 0; a difference of kind must exceed 4).
    for name in ("self-student", "teacher-local"):
        assert np.abs(grid(root, name) - teacher).mean() > 4, name


def _samples(path, **flags) -> torch.Tensor:
    """Eight samples (classes 0-7, sample.py's seeds for --seed 3) of the model at `path`, before decoding."""
    loaded, _ = load_for_sampling(path, **flags)
    process = create_process(loaded.process)
    spec = SamplingSpec.for_process(process, sampler=None, num_steps=STEPS, cfg_scale=4.0)
    return sample_latents(loaded.model, process, torch.arange(8), image_seeds(SEED, range(8)), spec)


def test_only_the_attention_weights_change(clear):
    root, teacher = clear["root"], clear["teacher"]
    for weights in ("model", "ema"):
        student = load_model(root / "self.pt", weights=weights).model.state_dict()
        assert student.keys() == teacher.keys()
        attention = [name for name in teacher if _is_attention(name)]
        assert len(attention) == 4 * 4  # qkv and proj, weight and bias, of 4 blocks
        for name, tensor in teacher.items():
            if _is_attention(name):
                assert not torch.equal(student[name], tensor), (weights, name)  # lr 1e-2: every one moved
            else:
                assert torch.equal(student[name], tensor), (weights, name)  # bitwise: frozen, and EMA kept it
        # --lr 0: nothing moves at all
        full = load_model(root / "full.pt", weights=weights).model.state_dict()
        assert all(torch.equal(full[name], tensor) for name, tensor in teacher.items())


def test_the_log_names_the_loss_terms_and_rerunning_the_command_ends_with_the_same_file(clear):
    import json

    root = clear["root"]
    trainable = sum(tensor.numel() for name, tensor in clear["teacher"].items() if _is_attention(name))
    total = sum(tensor.numel() for tensor in tiny_dit(in_channels=3, depth=4).parameters())
    for name in ("full", "self"):
        log = (root / "runs" / name / "log.txt").read_text()
        assert f"training the attention layers only ({trainable:,} of {total:,} parameters)" in log
        assert "CLEAR: loss = gt + 0.5 pred + 0.5 attn" in log
        assert "layer map (student block -> teacher block): 0->0, 1->1, 2->2, 3->3" in log  # unpruned: identity
        records = [json.loads(line) for line in (root / "runs" / name / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in records] == [1, 2]
        for r in records:
            assert r["loss"] == pytest.approx(r["gt"] + 0.5 * r["pred"] + 0.5 * r["attn"], rel=1e-5)
            if name == "full":  # the same model, the same attention: nothing to distil (float32 rounding aside)
                assert abs(r["attn"]) < 1e-9 and abs(r["pred"]) < 1e-6
            else:
                assert r["attn"] > 1e-4 and r["pred"] > 1e-6

    # The run folder holds the finished run: the same command, with the model file gone, writes it again from the
    # run's last checkpoint (the local kind, the frozen weights and the EMA all come back from it), byte for byte.
    saved = (root / "self.pt").read_bytes()
    (root / "self.pt").unlink()
    proc = run_cli(clear["commands"]["self"])
    assert "is already complete (2 steps)" in output(proc)
    assert (root / "self.pt").read_bytes() == saved


#################################################################################
#                      Composition: pruning, other families                     #
#################################################################################

@pytest.fixture(scope="module")
def pruned(clear):
    """The teacher depth-pruned by prune_by_index.py (blocks 0 and 2) and width-pruned by prune_by_score.py (half of
    every block's heads and MLP channels), each distilled with --attention local (radius 2, keys pooled 2 x 2)."""
    root = clear["root"]
    bare = [str(root / "teacher.pt"), *BARE]
    run_all(["prune_by_index.py", "--ckpt", *bare, "--kept-indices", "0", "2", "--save-model", str(root / "depth.pt")],
            ["prune_by_score.py", "--ckpt", *bare, "--width-ratio", "0.5", "--width-criterion", "magnitude",
             "--save-model", str(root / "width.pt")])
    local = ["--attention", "local", "--attention-radius", "2", "--attention-pool", "2"]
    procs = run_all(kd(root, "depth-clear", [str(root / "depth.pt")], *local),
                    kd(root, "width-clear", [str(root / "width.pt")], *local))
    return {"depth": procs[0], "width": procs[1]}


def test_pruned_students_distil_local_attention_with_their_lineages_layer_map(clear, pruned):
    root = clear["root"]
    maps = {"depth": "0->0, 1->2", "width": "0->0, 1->1, 2->2, 3->3"}
    for name, layer_map in maps.items():
        assert f"layer map (student block -> teacher block): {layer_map}" in output(pruned[name])
        assert "CLEAR: loss = gt + 0.5 pred + 0.5 attn" in output(pruned[name])
        source, student = load_model(root / f"{name}.pt"), load_model(root / f"{name}-clear.pt")
        assert student.config == {**source.config, "attention": LOCAL_POOLED}  # depth and widths as pruned
        assert student.lineage == source.lineage
        before, after = source.model.state_dict(), student.model.state_dict()
        for key, tensor in before.items():
            assert torch.equal(after[key], tensor) != _is_attention(key), key
    assert load_model(root / "depth-clear.pt").config["depth"] == 2
    assert load_model(root / "width-clear.pt").config["block_widths"][0] == {"num_heads": 1, "head_dim": 16,
                                                                            "mlp_hidden": 64}


def test_local_models_keep_their_kind_through_every_pruning_script(clear, pruned):
    root = clear["root"]
    common = ["--data-path", str(root / "latents"), "--results-dir", str(root / "runs"), "--global-batch-size", "8",
              "--num-workers", "0", "--device", "cpu"]
    run_all(["prune_by_index.py", "--ckpt", str(root / "width-clear.pt"), "--kept-indices", "0", "3",
             "--save-model", str(root / "pruned-index.pt")],
            ["prune_by_score.py", "--ckpt", str(root / "self.pt"), "--criterion", "random", "--n-pruned", "1",
             "--width-ratio", "0.5", "--width-criterion", "magnitude", "--save-model", str(root / "pruned-score.pt")],
            ["prune_by_learning.py", "--load-weight", str(root / "self.pt"), "--groups", "2x1:2", "--max-steps", "1",
             "--prefix", "learning", *common, "--save-model", str(root / "pruned-learning.pt")])
    for name, kind, depth in (("index", LOCAL_POOLED, 2), ("score", LOCAL_SELF, 3), ("learning", LOCAL_SELF, 2)):
        loaded = load_model(root / f"pruned-{name}.pt")
        assert loaded.config["attention"] == kind and loaded.config["depth"] == depth, name
        assert all(m.kind == kind for m in attention_modules(loaded.model)), name
    assert load_model(root / "pruned-index.pt").lineage["kept_heads"] is not None  # the width lineage carried on


def test_a_sit_distils_local_attention_and_samples(clear, tmp_path):
    root = clear["root"]
    save_model(tmp_path / "sit.pt", tiny_sit(in_channels=3, depth=2))
    source = load_model(tmp_path / "sit.pt")
    proc = run_cli(["train_masked_kd.py", "--load-weight", str(tmp_path / "sit.pt"), "--load-teacher",
                    str(tmp_path / "sit.pt"), "--data-path", str(root / "latents"), "--results-dir", str(tmp_path),
                    "--global-batch-size", "8", "--num-workers", "0", "--max-steps", "2", "--lr", "1e-2",
                    "--device", "cpu", "--attention", "local", "--attention-radius", "2",
                    "--save-model", str(tmp_path / "sit-local.pt")])
    assert "layer map (student block -> teacher block): 0->0, 1->1" in output(proc)
    student = load_model(tmp_path / "sit-local.pt")
    assert (student.arch, student.config["attention"]) == ("SiT", {"kind": "local", "radius": 2, "pool": 1})
    assert student.process == source.process
    before, after = source.model.state_dict(), student.model.state_dict()
    for key, tensor in before.items():
        assert torch.equal(after[key], tensor) != _is_attention(key), key
    loaded, _ = load_for_sampling(tmp_path / "sit-local.pt")
    process = create_process(loaded.process)
    spec = SamplingSpec.for_process(process, sampler=None, num_steps=4, cfg_scale=1.0)
    x = sample_latents(loaded.model, process, torch.arange(2), image_seeds(0, range(2)), spec)
    assert x.shape == (2, 3, 8, 8) and torch.isfinite(x).all()


#################################################################################
#                   Bare weights: local only when the flags say so              #
#################################################################################

def test_a_bare_state_dict_runs_local_only_when_the_flags_say_so(clear):
    root, procs = clear["root"], clear["procs"]
    assert "attention: global (sdpa, 4 layers)" in output(procs["teacher"])
    assert f"attention: local r={SELF} (" in output(procs["teacher-local"])
    assert "attention: local" not in output(procs["teacher"])
    assert np.abs(grid(root, "teacher-local") - grid(root, "teacher")).mean() > 4  # it ran local, not just said so
    for attention, kind in ((None, {"kind": "global"}), (LOCAL_SELF, LOCAL_SELF)):
        loaded = load_model(root / "teacher.pt", "DiT", num_heads=2, attention=attention)
        assert loaded.config["attention"] == kind
        assert all(m.kind == kind for m in attention_modules(loaded.model))


#################################################################################
#                                One-line errors                                #
#################################################################################

@pytest.fixture(scope="module")
def errors(clear, tmp_path_factory):
    """Each refused command, run once (two at a time): name -> (process, what the line must name)."""
    root = clear["root"]
    out = tmp_path_factory.mktemp("errors")
    save_model(out / "mar.pt", tiny_mar())  # pixel-space 3 x 8 x 8: the latents fit it
    torch.save(tiny_dit(in_channels=3, depth=2).state_dict(), out / "depth2.pt")  # depth 2, no lineage
    teacher, bare = root / "teacher.pt", [str(root / "teacher.pt"), *BARE]
    local = ["--attention", "local", "--attention-radius", "2"]
    cases = {
        "radius-without-local": (sample(out, teacher, "x", *BARE, "--attention-radius", "2"),
                                 ["--attention-radius", "add --attention local"]),
        "local-without-radius": (sample(out, teacher, "x", *BARE, "--attention", "local"),
                                 ["--attention local needs --attention-radius"]),
        "global-on-a-local-file": (sample(out, root / "self.pt", "x", "--attention", "global"),
                                   ["--attention says global", f"{root / 'self.pt'} records local r=1",
                                    "drop --attention", "does not reload as global"]),
        "pool-not-dividing-the-grid": (sample(out, teacher, "x", *BARE, *local, "--attention-pool", "3"),
                                       ["factor 3 (--attention-pool) does not divide the token grid 4x4"]),
        "mar": (["train_masked_kd.py", "--load-weight", str(out / "mar.pt"), "--load-teacher", str(out / "mar.pt"),
                 "--data-path", str(root / "latents"), "--results-dir", str(out / "runs"), "--prefix", "mar", *local],
                ["MAR has no attention kinds", "full token grid", "drop --attention"]),
        "masked-kd-flags-with-local": (kd(root, "alpha", bare, *local, "--alpha-kd", "0.5", "--mask-k", "3", out=out),
                                       ["--alpha-kd, --mask-k", "CLEAR's", "drop --alpha-kd, --mask-k"]),
        "clear-flags-without-local": (kd(root, "pred", bare, "--pred-weight", "1", out=out),
                                      ["--pred-weight", "Masked KD's", "drop --pred-weight"]),
        "clear-student-of-another-depth-without-lineage": (
            kd(root, "shallow", [str(out / "depth2.pt"), *BARE], *local, out=out),
            ["records no lineage", "pass --layer-map"]),
    }
    procs = run_all(*(command for command, _ in cases.values()), check=False)
    return {"out": out, **{name: (proc, needles) for (name, (_, needles)), proc in zip(cases.items(), procs)}}


ERRORS = ["radius-without-local", "local-without-radius", "global-on-a-local-file", "pool-not-dividing-the-grid",
          "mar", "masked-kd-flags-with-local", "clear-flags-without-local",
          "clear-student-of-another-depth-without-lineage"]


@pytest.mark.parametrize("case", ERRORS)
def test_refusals_are_one_line(errors, case):
    proc, needles = errors[case]
    line = one_line_error(proc, 2, *needles)
    if case == "clear-student-of-another-depth-without-lineage":
        assert "--beta-feat" not in line  # CLEAR refuses --beta-feat: not a way out to offer
    out = errors["out"]
    assert not (out / "x.png").exists() and not any((out / "runs").glob("*"))  # no output, no run folder left


def test_method_flags_are_checked_against_their_defaults():
    """Only flags changed from their defaults count: a command that restates a default runs."""
    check_method_flags(MaskedKDOptions(alpha_kd=0.9, pred_weight=0.5), clear=True)
    check_method_flags(MaskedKDOptions(pred_weight=0.5, beta_feat=0.0), clear=False)
