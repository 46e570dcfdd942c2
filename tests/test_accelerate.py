"""accelerate launch (issue 23): the scripts run under `accelerate launch` as under torchrun.

accelerate starts its processes through torch's elastic launcher and sets the same RANK / WORLD_SIZE /
LOCAL_RANK variables, which `tinyfusion.distributed` reads. On a CPU machine `--multi_gpu --num_processes 2`
forms two gloo processes (`--cpu --num_processes 2` would start a single process unless MPI is present).
"""

import signal

import numpy as np
import pytest
import torch
from helpers import ROOT, run_cli, tiny_dit, write_features

from tinyfusion.checkpoint import read_checkpoint, save_model
from tinyfusion.synthetic import class_pattern_latents

ACCELERATE = ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no"]


def accelerate(args, check=True):
    """A script under `accelerate launch` with two processes (run_cli runs `python ARGS`)."""
    return run_cli([*ACCELERATE, *args], check=check)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    root = tmp_path_factory.mktemp("accelerate")
    model = tiny_dit(in_channels=3, depth=2)
    save_model(root / "tiny.pt", model, codec={"vae": "none", "scaling_factor": 1.0})
    latents, labels = class_pattern_latents(32, tuple(model.data_shape))
    write_features(root / "features", latents, labels, 10)
    return root


def test_sample_ddp_under_accelerate_writes_the_bytes_of_torchrun(small):
    outputs = {}
    for name, launch in (("accelerate", accelerate), ("torchrun", lambda a: run_cli(a, nproc=2))):
        proc = launch(["sample_ddp.py", "--ckpt", str(small / "tiny.pt"), "--num-sampling-steps", "3", "--device",
                       "cpu", "--num-fid-samples", "10", "--per-proc-batch-size", "4", "--sample-dir",
                       str(small / name)])
        assert "on 2 process(es)" in proc.stdout + proc.stderr  # one world of two, not two worlds of one
        (npz,) = (small / name).glob("*.npz")
        outputs[name] = npz.read_bytes()
    assert outputs["accelerate"] == outputs["torchrun"]
    with np.load(small / "accelerate" / npz.name) as f:
        assert f["arr_0"].shape == (10, 8, 8, 3)


def _train(small, prefix, *extra):
    return ["train.py", "--load-weight", str(small / "tiny.pt"), "--data-path", str(small / "features"),
            "--results-dir", str(small / "runs"), "--prefix", prefix, "--global-batch-size", "8", "--num-workers",
            "0", "--log-every", "1", "--max-steps", "4", "--ckpt-every", "2", "--device", "cpu", *extra]


def test_train_under_accelerate_resumes_and_ends_as_under_torchrun(small):
    run_cli(_train(small, "torchrun"), nproc=2)
    # Killed (SIGKILL) at the start of step 3 under accelerate, then the same command again: it resumes at step 2.
    spy = str(ROOT / "tests" / "helpers" / "fault_spy.py")
    killed = accelerate([spy, "step:3", *_train(small, "accelerate")[1:]], check=False)
    assert killed.returncode != 0 and f"Signal {signal.SIGKILL.value} (SIGKILL)" in killed.stderr
    resumed = accelerate(_train(small, "accelerate"))
    assert "step-0000002.pt at step 2" in resumed.stdout + resumed.stderr  # "resumed from ... at step 2"
    straight = read_checkpoint(small / "runs" / "torchrun" / "checkpoints" / "step-0000004.pt")
    again = read_checkpoint(small / "runs" / "accelerate" / "checkpoints" / "step-0000004.pt")
    for key in ("model", "ema"):
        assert straight[key].keys() == again[key].keys()
        for name in straight[key]:
            assert torch.equal(straight[key][name], again[key][name]), f"{key}/{name}"
    steps = [line for line in (small / "runs" / "accelerate" / "metrics.jsonl").read_text().splitlines()]
    assert len(steps) == 4  # each step logged once across the kill


def test_accelerate_is_a_requirement():
    text = (ROOT / "requirements.txt").read_text()
    assert any(line.split(">=")[0].strip() == "accelerate" for line in text.splitlines()), text
