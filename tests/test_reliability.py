"""Nothing lost, one clear line for every user error: refused overwrites, no non-finite checkpoint, integrity,
resumes that survive moves and kills, run-folder locks. Through the real CLI where a user meets them."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from helpers import ROOT, one_line_error, run_cli, tiny_dit, write_features

from tinyfusion.checkpoint import read_checkpoint, save_model
from tinyfusion.fileio import RunLock, truncate_jsonl


def _user_error(proc, *needles):
    """Exit status 2, one line on stderr, no traceback, naming what it should."""
    return one_line_error(proc, 2, *needles)


def _train_args(data, results, prefix, *extra):
    return ["train.py", "--model", "DiT-Nano/2", "--data-path", str(data), "--results-dir", str(results),
            "--prefix", prefix, "--global-batch-size", "8", "--num-workers", "0", "--log-every", "1", *extra]


def _final(run_dir, step):
    return read_checkpoint(run_dir / "checkpoints" / f"step-{step:07d}.pt")


def _assert_same_state(a, b):
    for key in ("model", "ema"):
        assert a[key].keys() == b[key].keys()
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), f"{key}/{name}"
    opt_a, opt_b = a["training_state"]["optimizer"]["state"], b["training_state"]["optimizer"]["state"]
    for i in opt_a:
        for k in opt_a[i]:
            assert torch.equal(opt_a[i][k], opt_b[i][k]), f"optimizer {i}/{k}"


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A tiny features folder and a checkpoint of DiT-Nano/2 for it (8x8 pixels, 3 channels)."""
    root = tmp_path_factory.mktemp("small")
    rng = np.random.default_rng(0)
    latents = rng.standard_normal((32, 1, 3, 8, 8)).astype(np.float32)
    data = write_features(root / "features", latents, rng.integers(0, 10, 32), 10)
    ckpt = root / "model.pt"
    torch.manual_seed(0)
    from models import create_model
    save_model(ckpt, create_model("DiT-Nano/2", input_size=8, in_channels=3, num_classes=10))
    return {"data": data, "ckpt": ckpt, "root": root}


#################################################################################
#                        1. Outputs never overwrite inputs                      #
#################################################################################

def test_an_output_that_is_an_input_is_refused_before_any_work(small, tmp_path):
    source = tmp_path / "model.pt"
    shutil.copy(small["ckpt"], source)
    before = source.read_bytes()
    (tmp_path / "alias.pt").symlink_to(source)
    os.link(source, tmp_path / "hardlink.pt")
    proc = run_cli(["prune_by_index.py", "--ckpt", str(source), "--kept-indices", "0", "2",
                    "--save-model", os.path.relpath(tmp_path / "alias.pt", ROOT)], check=False)
    _user_error(proc, "--save-model", "same file as --ckpt", "choose another --save-model")
    from tinyfusion.paths import check_outputs
    for out in (source, tmp_path / "alias.pt", tmp_path / "hardlink.pt", tmp_path / "sub" / ".." / "model.pt"):
        with pytest.raises(ValueError, match="same file as --ckpt"):
            check_outputs({"--save-model": out}, {"--ckpt": os.path.relpath(source)})
    proc = run_cli(["prune_by_learning.py", "--load-weight", str(source), "--groups", "4x1:2", "--data-path",
                    str(small["data"]), "--max-steps", "1", "--results-dir", str(tmp_path), "--save-model",
                    str(tmp_path / "alias.pt")], check=False)
    _user_error(proc, "--save-model", "--load-weight")
    teacher = tmp_path / "teacher.pt"
    shutil.copy(small["ckpt"], teacher)
    teacher_bytes = teacher.read_bytes()
    proc = run_cli(["train_masked_kd.py", "--load-weight", str(source), "--load-teacher", str(teacher),
                    "--data-path", str(small["data"]), "--max-steps", "1", "--results-dir", str(tmp_path),
                    "--save-model", str(teacher)], check=False)
    _user_error(proc, "--save-model", "--load-teacher")
    samples = tmp_path / "samples.npz"
    np.savez(samples, arr_0=np.zeros((4, 8, 8, 3), np.uint8))
    samples_bytes = samples.read_bytes()
    proc = run_cli(["evaluator.py", str(samples), str(samples), "--out", str(samples)], check=False)
    _user_error(proc, "--out", "same file as")
    assert source.read_bytes() == before and teacher.read_bytes() == teacher_bytes
    assert samples.read_bytes() == samples_bytes
    assert not any(p.is_dir() for p in tmp_path.iterdir()), "a refused run left a folder"


def test_an_unwritable_output_is_refused_before_training(small, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    proc = run_cli(_train_args(small["data"], tmp_path, "run", "--max-steps", "2", "--save-model",
                               str(blocker / "out.pt")), check=False)
    _user_error(proc, "--save-model", "is a file, not a folder")
    assert not (tmp_path / "run").exists()
    proc = run_cli(_train_args(small["data"], blocker, "run", "--max-steps", "2"), check=False)
    _user_error(proc, "--results-dir/--prefix")


#################################################################################
#                            2. No non-finite checkpoint                        #
#################################################################################

def test_an_infinite_learning_rate_writes_no_checkpoint_and_fails(small, tmp_path):
    proc = run_cli(_train_args(small["data"], tmp_path, "inf", "--max-steps", "3", "--ckpt-every", "1", "--lr", "inf",
                               "--save-model", str(tmp_path / "final.pt")), check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    assert "the training diverged" in line and "not finite" in line
    written = list((tmp_path / "inf" / "checkpoints").glob("*.pt"))
    assert not (tmp_path / "final.pt").exists()
    for path in written:  # whatever was written before the weights broke is finite
        state = read_checkpoint(path)
        assert all(torch.isfinite(v).all() for k in ("model", "ema") for v in state[k].values())
    named = line.split("The last good checkpoint is ")[1].split(" (")[0]
    assert named == ("none" if not written else str(max(written)))


def test_a_disk_that_fills_up_mid_checkpoint_is_one_line_and_loses_nothing(small, tmp_path):
    run_cli(_train_args(small["data"], tmp_path, "straight", "--max-steps", "4", "--ckpt-every", "2"))
    spy = str(ROOT / "tests" / "helpers" / "fault_spy.py")  # the write of step 4's checkpoint fails with ENOSPC
    args = _train_args(small["data"], tmp_path, "full", "--max-steps", "4", "--ckpt-every", "2")
    proc = run_cli([spy, "enospc:4", *args[1:]], check=False)
    ckpts = tmp_path / "full" / "checkpoints"
    line = one_line_error(proc, 1, str(ckpts / "step-0000004.pt"), "No space left on device (ENOSPC)",
                          "nothing was replaced", f"The last checkpoint is {ckpts / 'step-0000002.pt'}",
                          "run the same command again")
    assert line.startswith("train.py: error: cannot write ")
    assert sorted(p.name for p in ckpts.iterdir()) == ["manifest.json", "step-0000002.pt"]  # no temporary left
    assert json.loads((ckpts / "manifest.json").read_text())["checkpoints"] == [{"file": "step-0000002.pt", "step": 2}]
    proc = run_cli(args)  # space freed: the same command resumes
    assert "step-0000002.pt at step 2" in proc.stdout
    _assert_same_state(_final(tmp_path / "straight", 4), _final(tmp_path / "full", 4))


#################################################################################
#                   3, 4. Resume by content; only the run's own files           #
#################################################################################

def test_a_moved_run_folder_with_a_relative_data_path_resumes_equal_to_a_straight_run(small, tmp_path):
    run_cli(_train_args(small["data"], tmp_path / "a", "straight", "--max-steps", "6", "--ckpt-every", "3"))
    spy = str(ROOT / "tests" / "helpers" / "fault_spy.py")  # killed at the start of step 3, after its checkpoint
    proc = run_cli([spy, "step:3", *_train_args(small["data"], tmp_path / "a", "moved", "--max-steps", "6",
                                                "--ckpt-every", "3")[1:]], check=False)
    assert proc.returncode == -signal.SIGKILL
    shutil.move(tmp_path / "a" / "moved", tmp_path / "b" / "moved")
    ckpts = tmp_path / "b" / "moved" / "checkpoints"
    best = ckpts / "step-best.pt"
    shutil.copy(ckpts / "step-0000003.pt", best)  # a user's own file, whose name sorts last
    best_bytes = best.read_bytes()
    relative = os.path.relpath(small["data"], ROOT)
    proc = run_cli(_train_args(relative, tmp_path / "b", "moved", "--max-steps", "6", "--ckpt-every", "3",
                               "--keep-last", "1"))
    assert "resumed from" in proc.stdout and "step-0000003.pt at step 3" in proc.stdout
    _assert_same_state(_final(tmp_path / "a" / "straight", 6), _final(tmp_path / "b" / "moved", 6))
    assert best.read_bytes() == best_bytes  # ignored, and never rotated out
    assert sorted(p.name for p in ckpts.iterdir()) == ["manifest.json", "step-0000006.pt", "step-best.pt"]
    steps = [json.loads(line)["step"] for line in (tmp_path / "b" / "moved" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 7))


def test_other_data_is_named_as_the_setting_that_differs(small, tmp_path):
    run_cli(_train_args(small["data"], tmp_path, "run", "--max-steps", "2", "--ckpt-every", "2"))
    other = write_features(tmp_path / "other", np.zeros((32, 1, 3, 8, 8), np.float32), np.zeros(32, np.int64), 10)
    proc = run_cli(_train_args(other, tmp_path, "run", "--max-steps", "2", "--ckpt-every", "2"), check=False)
    _user_error(proc, "the content of --data-path", "recorded")


#################################################################################
#                          5, 8. One line for user errors                       #
#################################################################################

@pytest.mark.parametrize("case", ["missing-ckpt", "zero-period", "wrong-model", "not-features", "empty-groups",
                                  "score-depth", "oracle-depth"])
def test_user_errors_are_one_line_and_exit_2(small, tmp_path, case):
    data, ckpt = str(small["data"]), str(small["ckpt"])
    args, needles = {
        "missing-ckpt": (["sample.py", "--ckpt", str(tmp_path / "nope.pt")], ["nope.pt", "does not exist"]),
        "zero-period": (_train_args(data, tmp_path, "r", "--max-steps", "2", "--ckpt-every", "0"),
                        ["--ckpt-every", "at least 1"]),
        "wrong-model": (["sample.py", "--ckpt", ckpt, "--model", "DiT-S/2"], ["--model DiT-S/2 does not match"]),
        "not-features": (_train_args(tmp_path, tmp_path, "r", "--max-steps", "2"), ["no features at"]),
        "empty-groups": (["prune_by_learning.py", "--load-weight", ckpt, "--groups", "", "--data-path", data,
                          "--max-steps", "1", "--results-dir", str(tmp_path), "--save-model", str(tmp_path / "p.pt")],
                         ["--groups is empty", "4x1:2"]),
        "score-depth": (["prune_by_score.py", "--ckpt", ckpt, "--criterion", "random", "--target-depth", "9",
                         "--save-model", str(tmp_path / "p.pt")], ["--target-depth 9", "depth 8", "between 1 and 7"]),
        "oracle-depth": (["prune_by_index.py", "--ckpt", ckpt, "--preset", "oracle", "--target-depth", "3",
                          "--save-model", str(tmp_path / "p.pt")], ["--preset oracle", "--target-depth 3"]),
    }[case]
    _user_error(run_cli(args, check=False), *needles)
    assert not (tmp_path / "r").exists()


def test_under_torchrun_the_error_is_printed_once(small, tmp_path):
    proc = run_cli(_train_args(small["data"], tmp_path, "r", "--max-steps", "2", "--model", "DiT-S/2",
                               "--load-weight", str(small["ckpt"])), nproc=2, check=False)
    assert proc.returncode != 0
    ours = [line for line in proc.stderr.splitlines() if line.startswith("train.py: error:")]
    assert len(ours) == 1 and "does not match" in ours[0]


def test_a_teacher_that_cannot_teach_is_refused(small, tmp_path):
    from models import create_model
    teacher = tmp_path / "teacher.pt"
    save_model(teacher, create_model("DiT-Nano/2", input_size=8, in_channels=3, num_classes=7))
    proc = run_cli(["train_masked_kd.py", "--load-weight", str(small["ckpt"]), "--load-teacher", str(teacher),
                    "--data-path", str(small["data"]), "--max-steps", "1", "--results-dir", str(tmp_path),
                    "--prefix", "kd"], check=False)
    _user_error(proc, "cannot teach this student", "num_classes 10 vs 7")
    assert not (tmp_path / "kd").exists()


def test_damaged_feature_folders_are_named_before_training(small, tmp_path):
    truncated = tmp_path / "truncated"
    shutil.copytree(small["data"], truncated)
    text = (truncated / "index.json").read_text()
    (truncated / "index.json").write_text(text[: len(text) // 2])
    _user_error(run_cli(_train_args(truncated, tmp_path, "r", "--max-steps", "2"), check=False),
                "index.json is damaged")
    missing = tmp_path / "missing"
    shutil.copytree(small["data"], missing)
    (missing / "shards" / "labels-00000.npy").unlink()
    _user_error(run_cli(_train_args(missing, tmp_path, "r", "--max-steps", "2"), check=False),
                "lack shards/labels-00000.npy")
    assert not (tmp_path / "r").exists()


#################################################################################
#                          6, 7. What a file is; integrity                      #
#################################################################################

def test_files_that_are_not_checkpoints_are_named(tmp_path):
    from PIL import Image

    (tmp_path / "page.pt").write_text("<!DOCTYPE html>\n<html><body>Sign in</body></html>")
    Image.new("RGB", (4, 4)).save(tmp_path / "image.pt", format="PNG")
    (tmp_path / "empty.pt").write_bytes(b"")
    save_model(tmp_path / "whole.pt", tiny_dit())
    data = (tmp_path / "whole.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) * 2 // 3])
    line = _user_error(run_cli(["sample.py", "--ckpt", str(tmp_path / "page.pt")], check=False), "an HTML page")
    assert "could run code" not in line
    for name, needle in (("image.pt", "a PNG image"), ("empty.pt", "an empty file"),
                         ("cut.pt", "a truncated zip archive")):
        with pytest.raises(ValueError, match=f"is not a checkpoint: it is {needle}") as info:
            read_checkpoint(tmp_path / name)
        assert "could run code" not in str(info.value)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_a_flipped_byte_is_detected(tmp_path, suffix):
    path = tmp_path / f"model{suffix}"
    save_model(path, tiny_dit())
    read_checkpoint(path)  # intact
    data = bytearray(path.read_bytes())
    weights = tiny_dit().state_dict()["blocks.0.attn.qkv.weight"].numpy().tobytes()
    at = bytes(data).find(weights[:64])  # inside a weight tensor's bytes
    assert at > 0
    data[at + 17] ^= 0x01
    path.write_bytes(bytes(data))
    _user_error(run_cli(["sample.py", "--ckpt", str(path)], check=False), "is corrupted", "SHA-256")


def test_safetensors_with_metadata_the_loader_cannot_use_is_explained(tmp_path):
    from safetensors.torch import save_file

    weights = {k: v.contiguous() for k, v in tiny_dit().state_dict().items()}
    save_file(weights, str(tmp_path / "odd.safetensors"), metadata={"tinyfusion": "{\"format\": \"other\"}"})
    with pytest.raises(ValueError, match="does not describe a model"):
        read_checkpoint(tmp_path / "odd.safetensors")
    save_file(weights, str(tmp_path / "bad.safetensors"), metadata={"tinyfusion": "{not json"})
    with pytest.raises(ValueError, match="not valid JSON"):
        read_checkpoint(tmp_path / "bad.safetensors")


#################################################################################
#                   10. SIGINT, locks, temporary files, log lines               #
#################################################################################

def test_ctrl_c_saves_and_resumes(small, tmp_path):
    args = _train_args(small["data"], tmp_path, "run", "--max-steps", "400", "--ckpt-every", "1000")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 120
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 2) and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, output
    assert "stopped by SIGINT" in output
    saved = list((tmp_path / "run" / "checkpoints").glob("step-*.pt"))
    assert len(saved) == 1 and read_checkpoint(saved[0])["training_state"]["step"] >= 2
    assert not (tmp_path / "run" / RunLock.NAME).exists()


def test_a_live_lock_refuses_a_second_run_and_a_stale_one_is_taken_over(small, tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    lock = folder / RunLock.NAME
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "started": "now",
                                "command": "train.py ..."}))
    _user_error(run_cli(_train_args(small["data"], tmp_path, "run", "--max-steps", "2"), check=False),
                f"in use by pid {os.getpid()}", str(lock))
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": int(dead.stdout), "started": "then"}))
    (folder / "checkpoints").mkdir()
    orphan = folder / "checkpoints" / ".step-0000001.pt.abc123.tmp"
    orphan.write_bytes(b"half a checkpoint")
    proc = run_cli(_train_args(small["data"], tmp_path, "run", "--max-steps", "2"))
    assert f"removed the stale lock of pid {int(dead.stdout)}" in proc.stdout
    assert not orphan.exists() and not lock.exists()


def test_a_lock_from_another_host_is_stale_only_without_a_heartbeat(tmp_path):
    lock = RunLock(tmp_path, heartbeat_s=0.05, stale_s=60)
    (tmp_path / RunLock.NAME).write_text(json.dumps({"host": "elsewhere", "pid": 1}))
    with pytest.raises(ValueError, match="in use by pid 1 on elsewhere"):
        lock.acquire()
    old = time.time() - 3600
    os.utime(tmp_path / RunLock.NAME, (old, old))
    with lock:
        first = (tmp_path / RunLock.NAME).stat().st_mtime
        time.sleep(0.3)
        assert (tmp_path / RunLock.NAME).stat().st_mtime > first  # the heartbeat
        assert json.loads((tmp_path / RunLock.NAME).read_text())["pid"] == os.getpid()
    assert lock.removed_stale["host"] == "elsewhere" and not (tmp_path / RunLock.NAME).exists()


def test_log_lines_past_a_resume_point_are_dropped(tmp_path):
    log = tmp_path / "metrics.jsonl"
    log.write_text("".join(json.dumps({"step": s}) + "\n" for s in range(1, 6)) + '{"step": 6, "lo')
    truncate_jsonl(log, 3)
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == [1, 2, 3]


#################################################################################
#                                Fault injection                                #
#################################################################################

def test_killed_anywhere_the_resumed_run_ends_bitwise_equal_and_no_checkpoint_is_unreadable(small, tmp_path):
    common = ["--max-steps", "12", "--ckpt-every", "2", "--keep-last", "2"]
    run_cli(_train_args(small["data"], tmp_path, "straight", *common))
    run = tmp_path / "killed"
    spy = str(ROOT / "tests" / "helpers" / "fault_spy.py")
    # Each point kills the run once; the next command resumes it (and is killed at the next point).
    for point in ("step:3", "ckpt-write:4", "manifest:6", "log:7", "ckpt-write:10"):
        proc = run_cli([spy, point, *_train_args(small["data"], tmp_path, "killed", *common)[1:]], check=False)
        assert proc.returncode == -signal.SIGKILL, (point, proc.stderr[-2000:])
        for path in (run / "checkpoints").glob("*.pt"):
            read_checkpoint(path)  # every checkpoint present is complete and verified
    run_cli(_train_args(small["data"], tmp_path, "killed", *common))
    _assert_same_state(_final(tmp_path / "straight", 12), _final(run, 12))
    assert not list(run.rglob("*.tmp")) and not (run / RunLock.NAME).exists()
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 13))


def test_num_workers_default_to_what_the_machine_has():
    import train
    from tinyfusion.distributed import default_num_workers

    cores = len(os.sched_getaffinity(0))
    assert train.parse_args(["--data-path", "x"]).num_workers == default_num_workers() == max(0, min(8, cores - 1))
