"""Sampling: the samplers against exact answers and the official CFG recipe, sample.py, and sample_ddp.py
under real torchrun (world-size and batch-size invariance, resume, protocol)."""

import hashlib
import json

import numpy as np
import pytest
import torch
import torch.nn as nn
from helpers import no_network_path, run_cli, tiny_dit
from helpers.tolerance import LOOP_REL, assert_fp32_close
from PIL import Image

from diffusion import create_diffusion, gd
from processes import GaussianProcess
from tinyfusion.checkpoint import save_model
from tinyfusion.sampling import (
    SHOWCASE_CLASSES,
    SamplingSpec,
    image_seeds,
    load_for_sampling,
    resolve_class_labels,
    sample_latents,
    to_uint8,
)

# A pixel-space tiny DiT (3 channels, 8 x 8 images), so that no VAE is needed: --vae none.
PIXEL = dict(in_channels=3, depth=2)
STEPS = ["--num-sampling-steps", "5", "--vae", "none", "--device", "cpu"]


def _noise(seeds, shape):
    """x_T of each image: the first draw of its own generator."""
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    return generators, torch.stack([torch.randn(shape, generator=g) for g in generators])


#################################################################################
#                                  Samplers                                     #
#################################################################################
PROCESS = GaussianProcess()


class GaussianOracle(nn.Module):
    """The exact noise prediction for data ~ N(0, std^2 I) under DiT's linear schedule.

    The probability-flow ODE then maps x_T to x_0 = std x_T / sqrt(abar_T std^2 + 1 - abar_T): an exact
    answer that catches a wrong schedule or timestep convention in any sampler.
    """

    def __init__(self, std: float):
        super().__init__()
        self.std, self.num_classes = std, 10
        self.config = dict(in_channels=3, input_size=16, learn_sigma=False)
        self.data_shape, self.label_dropout = (3, 16, 16), 0.0
        self.anchor = nn.Parameter(torch.zeros(()))  # gives the sampler a device to read
        abar = np.cumprod(1 - gd.get_named_beta_schedule("linear", 1000))
        self.register_buffer("abar", torch.tensor(abar, dtype=torch.float32))

    def forward(self, x, t, y):
        a = self.abar[t].view(-1, 1, 1, 1)
        return (1 - a).sqrt() * x / (a * self.std ** 2 + 1 - a)


def test_samplers_reach_the_exact_answer_on_gaussian_data():
    std, seeds = 0.5, [1, 2, 3, 4]
    oracle, labels = GaussianOracle(std), torch.zeros(4, dtype=torch.long)
    _, x_T = _noise(seeds, (3, 16, 16))
    abar_T = oracle.abar[-1]
    exact = std * x_T / (abar_T * std ** 2 + 1 - abar_T).sqrt()

    def error(sampler, steps):
        out = sample_latents(oracle, GaussianProcess(learn_sigma=False), labels, seeds,
                             SamplingSpec(sampler, steps, cfg_scale=1.0))
        return (out - exact).abs().max().item(), out

    # DPM-Solver++ 2M is second order: nearly exact at 50 steps (8e-4 measured).
    assert error("dpm++", 50)[0] < 1e-2
    # DDIM is first order: the error halves as the steps double.
    ddim_50 = error("ddim", 50)[0]
    assert ddim_50 < 0.15 and ddim_50 < 0.6 * error("ddim", 25)[0]
    # Ancestral sampling is stochastic: it matches the data's spread, not the ODE's map.
    assert abs(error("ddpm", 50)[1].std().item() - std) < 0.05


def test_guidance_is_the_official_doubled_batch_recipe():
    """Ours (one row per image) equals the official loop over cat([z, z]) with labels cat([y, null])."""
    model, n, seeds = tiny_dit(**PIXEL).eval(), 3, [5, 6, 7]
    y = torch.tensor([1, 4, 9])
    generators, z = _noise(seeds, (3, 8, 8))
    # The official loop draws step noise for both halves: the first half from each image's generator.
    twins = [torch.Generator().manual_seed(100 + i) for i in range(n)]
    with torch.no_grad():
        official = create_diffusion("5").p_sample_loop(
            model.forward_with_cfg, (2 * n, 3, 8, 8), noise=torch.cat([z, z]), clip_denoised=False,
            model_kwargs=dict(y=torch.cat([y, torch.full_like(y, model.num_classes)]), cfg_scale=4.0),
            device=torch.device("cpu"), generator=generators + twins)[:n]
    ours = sample_latents(model, PROCESS, y, seeds, SamplingSpec("ddpm", 5, cfg_scale=4.0))
    assert_fp32_close(ours, official, rel=LOOP_REL)  # 5 steps, each batched differently
    unguided = sample_latents(model, PROCESS, y, seeds, SamplingSpec("ddpm", 5, cfg_scale=1.0))
    assert (unguided - ours).abs().max() > 1e-2


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpm++"])
def test_an_image_depends_on_its_own_seed_only(sampler):
    model = tiny_dit(**PIXEL).eval()
    labels, seeds = torch.tensor([2, 3, 8]), image_seeds(7, range(3))
    spec = SamplingSpec(sampler, 5, cfg_scale=4.0)
    batch = sample_latents(model, PROCESS, labels, seeds, spec)
    alone = sample_latents(model, PROCESS, labels[1:2], seeds[1:2], spec)
    assert torch.isfinite(batch).all()
    assert_fp32_close(alone[0], batch[1], rel=LOOP_REL)  # 5 steps, each batched differently
    assert (batch[0] - batch[1]).abs().max() > 1e-2


def test_guidance_needs_a_null_class():
    model = tiny_dit(**PIXEL, class_dropout_prob=0.0).eval()
    with pytest.raises(ValueError, match="--cfg-scale 1"):
        sample_latents(model, PROCESS, torch.tensor([0]), [0], SamplingSpec("ddim", 2, cfg_scale=4.0))


def test_spec_and_labels_are_checked():
    with pytest.raises(ValueError, match="--num-sampling-steps"):
        SamplingSpec.for_process(PROCESS, sampler="ddpm", num_steps=0)
    with pytest.raises(ValueError, match="between 1 and 1000"):
        SamplingSpec.for_process(PROCESS, sampler="ddpm", num_steps=1001)
    with pytest.raises(ValueError, match="not a sampler of the gaussian process"):
        SamplingSpec.for_process(PROCESS, sampler="ode", num_steps=5)
    assert SamplingSpec.for_process(PROCESS, sampler=None, num_steps=None) == SamplingSpec("ddpm", 250)
    assert SamplingSpec.for_process(PROCESS, sampler="dpm++", num_steps=None).num_steps == 20
    assert resolve_class_labels(None, 1000) == list(SHOWCASE_CLASSES)
    assert resolve_class_labels(None, 10) == list(range(8))
    assert resolve_class_labels(None, 3) == [0, 1, 2]
    with pytest.raises(ValueError, match="--class-labels 10 12: the model has 10 classes"):
        resolve_class_labels([1, 10, 12], 10)


def test_uint8_conversion_is_the_official_one():
    x = torch.tensor([-1.5, -1.0, -0.999, 0.0, 0.5, 1.0]).view(1, 1, 1, 6).expand(1, 3, 1, 6)
    # clamp(127.5 x + 128, 0, 255), truncated: -1 -> 0.5 -> 0, 0 -> 128, 0.5 -> 191.75 -> 191, 1 -> 255.
    assert to_uint8(x)[0, 0, :, 0].tolist() == [0, 0, 0, 128, 191, 255]
    assert to_uint8(x).shape == (1, 1, 6, 3) and to_uint8(x).dtype == np.uint8


def test_a_latent_model_without_a_vae_is_refused(tmp_path):
    save_model(tmp_path / "latent.pt", tiny_dit())
    with pytest.raises(ValueError, match="pass --vae ema"):
        load_for_sampling(tmp_path / "latent.pt", vae="none")


#################################################################################
#                                   sample.py                                   #
#################################################################################

def _grid_size(n, nrow=4, size=8, padding=2):
    """(width, height) of torchvision's make_grid."""
    cols, rows = min(n, nrow), -(-n // nrow)
    return cols * (size + padding) + padding, rows * (size + padding) + padding


def test_sample_py_self_describing_and_plain_checkpoints(tmp_path):
    save_model(tmp_path / "tiny.pt", tiny_dit(**PIXEL))
    run_cli(["sample.py", "--ckpt", str(tmp_path / "tiny.pt"), *STEPS, "--seed", "3", "--out", str(tmp_path / "a.png")])
    # A 10-class model: the default labels are its first eight classes.
    assert Image.open(tmp_path / "a.png").size == _grid_size(8)

    torch.save(tiny_dit(**PIXEL).state_dict(), tmp_path / "official.pt")  # bare: DiT and SiT share its layout
    proc = run_cli(["sample.py", "--ckpt", str(tmp_path / "official.pt"), "--num-heads", "2"], check=False)
    assert proc.returncode == 2 and "fits several families (DiT, SiT)" in proc.stderr
    run_cli(["sample.py", "--ckpt", str(tmp_path / "official.pt"), "--model", "DiT", "--num-heads", "2", *STEPS,
             "--sampler", "ddim",
             "--class-labels", "1", "2", "9", "--cfg-scale", "1.5", "--out", str(tmp_path / "b.png")])
    assert Image.open(tmp_path / "b.png").size == _grid_size(3)


def test_sample_py_without_ckpt_is_a_clear_error():
    proc = run_cli(["sample.py", "--vae", "none"], check=False)
    assert proc.returncode == 2 and "the following arguments are required: --ckpt" in proc.stderr


#################################################################################
#                                  sample_ddp.py                                #
#################################################################################

N, NAME = 10, "tiny-ddpm5-cfg1.5-seed11-n10"


def _sample_ddp(ckpt, sample_dir, batch_size, nproc=1, check=True, extra=()):
    return run_cli(["sample_ddp.py", "--ckpt", str(ckpt), *STEPS, "--num-fid-samples", str(N),
                    "--per-proc-batch-size", str(batch_size), "--global-seed", "11", "--sample-dir", str(sample_dir),
                    *extra], nproc=nproc, check=check)


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory):
    """The same 10 images with one process and with two (batch 4, so the last batch is ragged), and with
    batch 3."""
    root = tmp_path_factory.mktemp("sample_ddp")
    save_model(root / "tiny.pt", tiny_dit(**PIXEL))
    _sample_ddp(root / "tiny.pt", root / "one", 4, extra=["--save-png"])
    _sample_ddp(root / "tiny.pt", root / "two", 4, nproc=2)
    _sample_ddp(root / "tiny.pt", root / "batch3", 3)
    return root


def test_sample_ddp_is_byte_identical_for_any_world_size(ddp_runs):
    one, two = ddp_runs / "one" / f"{NAME}.npz", ddp_runs / "two" / f"{NAME}.npz"
    assert _sha(one) == _sha(two)
    with np.load(one) as data:
        assert data["arr_0"].shape == (N, 8, 8, 3) and data["arr_0"].dtype == np.uint8
        assert data["arr_1"].dtype == np.int64 and set(data["arr_1"].tolist()) <= set(range(10))
        assert len(set(data["arr_1"].tolist())) > 3  # labels are drawn per image, not constant
        png = np.array(Image.open(ddp_runs / "one" / NAME / "png" / "000009.png"))
        np.testing.assert_array_equal(png, data["arr_0"][9])


def test_sample_ddp_other_batch_size_differs_by_rounding_only(ddp_runs):
    with np.load(ddp_runs / "one" / f"{NAME}.npz") as a, np.load(ddp_runs / "batch3" / f"{NAME}.npz") as b:
        np.testing.assert_array_equal(a["arr_1"], b["arr_1"])
        diff = np.abs(a["arr_0"].astype(int) - b["arr_0"].astype(int))
        assert diff.max() <= 1 and (diff == 0).mean() > 0.99


def test_sample_ddp_protocol_json(ddp_runs):
    record = json.loads((ddp_runs / "one" / f"{NAME}.json").read_text())
    assert record["checkpoint_path"] == str(ddp_runs / "tiny.pt")
    assert record["checkpoint_sha256"] == _sha(ddp_runs / "tiny.pt")
    assert record["model_config"]["depth"] == 2 and record["lineage"] is None and record["weights"] == "model"
    assert (record["sampler"], record["num_sampling_steps"], record["cfg_scale"]) == ("ddpm", 5, 1.5)
    assert (record["guided_channels"], record["vae"], record["precision"]) == (3, "none", "fp32")
    assert (record["global_seed"], record["num_samples"], record["per_process_batch_size"]) == (11, N, 4)
    assert record["torch"] == torch.__version__ and record["image_size"] == 8
    assert record["npz_sha256"] == _sha(ddp_runs / "one" / f"{NAME}.npz")


def test_sample_ddp_resumes_only_missing_parts(ddp_runs):
    run_dir, npz = ddp_runs / "one" / NAME, ddp_runs / "one" / f"{NAME}.npz"
    original = _sha(npz)
    parts = sorted(run_dir.glob("part-*.npz"))
    assert len(parts) == 3  # 10 images in batches of 4
    kept = {p: p.stat().st_mtime_ns for p in parts if p.name != "part-000001.npz"}
    (run_dir / "part-000001.npz").unlink()
    npz.unlink()
    proc = _sample_ddp(ddp_runs / "tiny.pt", ddp_runs / "one", 4)
    assert "sampling 1 of 3 batches" in proc.stdout
    assert {p: p.stat().st_mtime_ns for p in kept} == kept
    assert _sha(npz) == original


def test_sample_ddp_refuses_a_folder_of_another_protocol(ddp_runs):
    proc = _sample_ddp(ddp_runs / "tiny.pt", ddp_runs / "one", 5, check=False)
    assert proc.returncode != 0
    assert "holds samples of another protocol" in proc.stderr and "per_process_batch_size: 4 recorded, 5 now" in \
        proc.stderr


def test_a_pixel_checkpoint_samples_from_the_file_alone_without_network(tmp_path):
    """The codec comes from the checkpoint: no --vae, no --model, and no connection is ever opened."""
    from tinyfusion.vae import codec_record

    model = tiny_dit(**PIXEL)
    save_model(tmp_path / "pixels.pt", model, codec=codec_record("none", 1.0))
    torch.save(model.state_dict(), tmp_path / "legacy.pt")  # records nothing: 3 channels read as pixels
    env = {"PYTHONPATH": no_network_path(tmp_path)}
    for ckpt, extra in (("pixels.pt", []), ("legacy.pt", ["--model", "DiT", "--num-heads", "2"])):
        out = tmp_path / f"{ckpt}.png"
        proc = run_cli(["sample.py", "--ckpt", str(tmp_path / ckpt), *extra, "--num-sampling-steps", "2",
                        "--device", "cpu", "--class-labels", "1", "2", "--out", str(out)], env=env)
        assert "codec: none" in proc.stdout
        assert Image.open(out).size == (2 * 8 + 3 * 2, 8 + 2 * 2)  # two 8x8 images in one row, 2 px padding
