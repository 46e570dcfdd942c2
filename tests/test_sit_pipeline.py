"""SiT through the whole pipeline: the transport as a noise process, and every script on a tiny SiT."""

import json

import numpy as np
import pytest
import torch
from helpers import run_cli, tiny_sit, train_teacher
from helpers.tolerance import LOOP_REL, assert_fp32_close

from processes import Prediction, TransportProcess, create_process
from tinyfusion.checkpoint import load_model, read_checkpoint
from tinyfusion.sampling import SamplingSpec, sample_latents
from transport import Sampler, create_transport

#################################################################################
#                               The process                                     #
#################################################################################


def test_the_process_trains_with_the_transports_loss_at_its_own_draws():
    process = TransportProcess("GVP", "velocity")
    model = tiny_sit().eval()
    x, y = torch.randn(3, 4, 8, 8), torch.tensor([1, 2, 3])
    draws = process.draw(torch.Generator().manual_seed(0), 3, (4, 8, 8), torch.device("cpu"))
    assert draws["t"].shape == (3,) and ((draws["t"] >= 0) & (draws["t"] <= 1)).all()
    ours = process.training_losses(model, x, draws, dict(y=y))["loss"]
    official = create_transport("GVP", "velocity").training_losses(model, x, dict(y=y), t=draws["t"],
                                                                   x0=draws["noise"])["loss"]
    torch.testing.assert_close(ours, official, atol=0, rtol=0)
    assert process.record() == {"name": "transport", "path_type": "GVP", "prediction": "velocity",
                                "loss_weight": None, "train_eps": None, "sample_eps": None}
    assert create_process(process.record()).record() == process.record()
    assert process.time_domain().describe() == "t in [0, 1]"
    assert TransportProcess("VP").time_domain().end == pytest.approx(1 - 1e-5)


def test_distillation_compares_velocities():
    process = TransportProcess("Linear", "noise")
    x_t, t = torch.randn(2, 4, 8, 8), torch.tensor([0.3, 0.7])
    out = torch.randn(2, 4, 8, 8)
    assert torch.equal(process.distillation_loss(Prediction(out, x_t, t), Prediction(out, x_t, t)), torch.zeros(2))
    velocity = TransportProcess("Linear", "velocity")
    other = out + 0.5
    torch.testing.assert_close(velocity.distillation_loss(Prediction(other, x_t, t), Prediction(out, x_t, t)),
                               torch.full((2,), 0.25))


@pytest.mark.parametrize("sampler, options", [("ode", {"sampling_method": "dopri5"}),
                                              ("ode", {"sampling_method": "heun"}),
                                              ("sde", {"sampling_method": "Euler"})])
def test_a_sample_does_not_depend_on_its_batch_mates(sampler, options):
    model = tiny_sit(num_classes=10).eval()
    process = TransportProcess()
    spec = SamplingSpec.for_process(process, sampler=sampler, num_steps=6, options=options, cfg_scale=2.0)
    labels, seeds = torch.tensor([1, 4, 7]), [11, 12, 13]
    together = sample_latents(model, process, labels, seeds, spec)
    alone = torch.cat([sample_latents(model, process, labels[i:i + 1], seeds[i:i + 1], spec) for i in range(3)])
    assert_fp32_close(alone, together, rel=LOOP_REL)  # 6 steps, each batched differently
    assert torch.isfinite(together).all()


def test_the_ode_sampler_is_the_official_one_and_reports_its_evaluations():
    model = tiny_sit(num_classes=10).eval()
    process = TransportProcess()
    spec = SamplingSpec.for_process(process, sampler="ode", num_steps=8, options={"sampling_method": "heun"},
                                    cfg_scale=1.0)
    assert spec.options == {"sampling_method": "heun2", "atol": 1e-6, "rtol": 1e-3}
    labels = torch.tensor([3, 5])
    ours = sample_latents(model, process, labels, [1, 2], spec)
    noise = torch.stack([torch.randn(4, 8, 8, generator=torch.Generator().manual_seed(s)) for s in (1, 2)])
    official = Sampler(create_transport()).sample_ode(sampling_method="heun2", num_steps=8)(noise, model, y=labels)[-1]
    assert_fp32_close(ours, official, rel=LOOP_REL)  # 8 Heun steps, batched as the official loop batches them
    assert process.last_nfe.tolist() == [14, 14]


def test_sampler_options_are_checked_and_named():
    process = TransportProcess()
    with pytest.raises(ValueError, match="--sampling-method 'rk45' is not an ODE method"):
        SamplingSpec.for_process(process, sampler="ode", num_steps=5, options={"sampling_method": "rk45"})
    with pytest.raises(ValueError, match="--atol: not an option of the transport process's 'sde' sampler"):
        SamplingSpec.for_process(process, sampler="sde", num_steps=5, options={"atol": 1e-3})
    from processes import GaussianProcess
    with pytest.raises(ValueError, match="--sampling-method: not an option of the gaussian"):
        SamplingSpec.for_process(GaussianProcess(), sampler="ddim", num_steps=5, options={"sampling_method": "euler"})
    with pytest.raises(ValueError, match="not a sampler of the transport process"):
        SamplingSpec.for_process(process, sampler="ddim", num_steps=5)


#################################################################################
#                              Through the CLI                                  #
#################################################################################

@pytest.fixture(scope="module")
def sit(tmp_path_factory):
    """A tiny SiT of depth 4 trained from scratch by train.py on class patterns (its file records the transport)."""
    return train_teacher(tmp_path_factory.mktemp("sit"), tiny_sit(randomize=False, in_channels=3), max_steps=100)


def test_train_py_trains_a_sit_with_the_transport_loss(sit):
    assert sit["losses"][-1] < 0.85 * sit["losses"][0]  # 2.05 -> 1.69 measured
    loaded = load_model(sit["teacher"])
    assert loaded.arch == "SiT" and loaded.process["name"] == "transport"
    assert loaded.process["path_type"] == "Linear" and loaded.process["prediction"] == "velocity"


def test_prune_distill_and_sample_a_sit_on_one_and_two_processes(sit, tmp_path):
    data, teacher = str(sit["data"]), str(sit["teacher"])
    common = ["--data-path", data, "--results-dir", str(tmp_path), "--global-batch-size", "16", "--num-workers", "0",
              "--log-every", "5"]
    run_cli(["prune_by_learning.py", "--load-weight", teacher, "--groups", "2x1:2", "--delta-w", "--lora",
             "--max-steps", "10", "--prefix", "prune", "--save-model", str(tmp_path / "pruned.pt"), *common])
    pruned = load_model(tmp_path / "pruned.pt")
    assert pruned.arch == "SiT" and pruned.process == load_model(teacher).process
    assert len(pruned.lineage["kept_indices"]) == 2
    run_cli(["prune_by_score.py", "--ckpt", teacher, "--criterion", "loss", "--data-path", data, "--num-batches", "2",
             "--batch-size", "8", "--target-depth", "2", "--save-model", str(tmp_path / "loss.pt")])
    assert load_model(tmp_path / "loss.pt").arch == "SiT"
    run_cli(["train_masked_kd.py", "--load-weight", str(tmp_path / "pruned.pt"), "--load-teacher", teacher,
             "--max-steps", "10", "--lr", "1e-3", "--prefix", "kd", "--save-model", str(tmp_path / "kd.pt"), *common])
    kd = [json.loads(line) for line in (tmp_path / "kd" / "metrics.jsonl").read_text().splitlines()]
    assert all(0 < r["kd"] < 1e-2 and np.isfinite(r["gt"]) for r in kd)  # velocities compared, a close student
    student, recovered = load_model(tmp_path / "pruned.pt").model, load_model(tmp_path / "kd.pt").model
    assert any(not torch.equal(a, b) for a, b in zip(student.state_dict().values(), recovered.state_dict().values()))
    assert read_checkpoint(tmp_path / "kd.pt")["process"]["name"] == "transport"

    outputs = {}
    for sampler in (["--sampler", "ode"], ["--sampler", "sde", "--num-sampling-steps", "8"]):
        for nproc, batch in ((1, 4), (2, 2)):
            npz = tmp_path / f"{sampler[1]}-{nproc}.npz"
            run_cli(["sample_ddp.py", "--ckpt", str(tmp_path / "kd.pt"), "--num-fid-samples", "6",
                     "--per-proc-batch-size", str(batch), *sampler, "--cfg-scale", "1.5", "--sample-dir",
                     str(tmp_path / f"samples-{nproc}"), "--npz", str(npz)], nproc=nproc)
            outputs[(sampler[1], nproc)] = np.load(npz)["arr_0"]
            protocol = json.loads(npz.with_suffix(".json").read_text())
            assert protocol["sampler"] == sampler[1] and protocol["process"]["name"] == "transport"
        np.testing.assert_array_equal(outputs[(sampler[1], 1)], outputs[(sampler[1], 2)])
    assert protocol["sampler_options"]["diffusion_form"] == "SBDM"
    assert not np.array_equal(outputs[("ode", 1)], outputs[("sde", 1)])

    proc = run_cli(["sample.py", "--ckpt", str(tmp_path / "kd.pt"), "--sampler", "ode", "--sampling-method", "heun",
                    "--num-sampling-steps", "5", "--class-labels", "1", "2", "--out", str(tmp_path / "grid.png")])
    assert "function evaluations per image: mean 8.0 (min 8, max 8)" in proc.stdout

    from tinyfusion.evaluation import SmallClassifier, save_feature_extractor
    save_feature_extractor(tmp_path / "fx.pt", SmallClassifier(image_size=8, num_classes=10, width=4), name="toy")
    np.savez(tmp_path / "ref.npz", arr_0=np.concatenate([outputs[("sde", 1)]] * 2))
    run_cli(["evaluator.py", str(tmp_path / "ref.npz"), str(tmp_path / "ode-2.npz"), "--feature-extractor",
             str(tmp_path / "fx.pt"), "--out", str(tmp_path / "fid.json")])
    metrics = json.loads((tmp_path / "fid.json").read_text())["metrics"]
    assert np.isfinite(metrics["fid"]) and metrics["fid"] > 0
