"""The Gaussian family's diffusers samplers (dpm++, dpm++-sde, unipc, euler-a, ddim-hf) against diffusers' own
scheduler loop, their per-image generators, the official DDIM against diffusers' DDIM, and sample_ddp.py with a
stochastic sampler under 1 and 2 processes.

Tolerances: LOOP_REL (1e-4 of the largest magnitude) throughout. Ours and the reference run the same float32
operations, but a batch against a row alone (and guidance's doubled batch) lets the kernels block the sums
differently, and a loop of 5 to 1000 steps compounds each step's rounding (see helpers/tolerance.py); a wrong
timestep, schedule or noise draw moves the result by far more than 1e-3 of its scale.
"""

import hashlib

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    UniPCMultistepScheduler,
)
from helpers import run_cli, tiny_dit
from helpers.tolerance import LOOP_REL, assert_fp32_close

from diffusion import create_diffusion
from processes import GaussianProcess
from tinyfusion.checkpoint import save_model
from tinyfusion.sampling import SamplingSpec, sample_latents

PIXEL = dict(in_channels=3, depth=2)  # a pixel-space tiny DiT: 3 channels, 8 x 8, learned sigma (6 outputs)
PROCESS = GaussianProcess()
DIT_LINEAR = dict(num_train_timesteps=1000, beta_schedule="linear", beta_start=0.0001, beta_end=0.02,
                  prediction_type="epsilon")
SCHEDULERS = {  # each sampler's scheduler, configured here independently of processes/gaussian.py
    "dpm++": lambda: DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", **DIT_LINEAR),
    "dpm++-sde": lambda: DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++", **DIT_LINEAR),
    "unipc": lambda: UniPCMultistepScheduler(**DIT_LINEAR),
    "euler-a": lambda: EulerAncestralDiscreteScheduler(**DIT_LINEAR),
    "ddim-hf": lambda: DDIMScheduler(clip_sample=False, set_alpha_to_one=True, **DIT_LINEAR),
}
STOCHASTIC = ["dpm++-sde", "euler-a"]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return tiny_dit(**PIXEL).eval()


def _noise(seeds, shape=(3, 8, 8)):
    """x_T of each image (the first draw of its generator) and the generators, as sample_latents draws them."""
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    return generators, torch.stack([torch.randn(shape, generator=g) for g in generators])


@torch.no_grad()
def _diffusers_loop(scheduler, model, labels, seeds, num_steps, stochastic, time_of=lambda t: t):
    """diffusers' pipeline loop written out: set_timesteps, init_noise_sigma, scale_model_input, the model's
    noise (its first 3 of 6 channels), step (with one generator per image when the scheduler draws noise)."""
    generators, x = _noise(seeds)
    scheduler.set_timesteps(num_steps)
    x = x * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        eps = model(scheduler.scale_model_input(x, t), time_of(t).expand(len(x)), labels)[:, :3]
        kwargs = {"generator": generators} if stochastic else {}
        x = scheduler.step(eps, t, x, **kwargs).prev_sample
    return x


@pytest.mark.parametrize("sampler", list(SCHEDULERS))
def test_each_sampler_is_diffusers_own_loop(model, sampler):
    labels, seeds = torch.tensor([1, 7]), [3, 4]
    ours = sample_latents(model, PROCESS, labels, seeds, SamplingSpec(sampler, 6, cfg_scale=1.0))
    reference = _diffusers_loop(SCHEDULERS[sampler](), model, labels, seeds, 6, sampler in STOCHASTIC)
    assert torch.isfinite(ours).all()
    assert_fp32_close(ours, reference, rel=LOOP_REL)  # the same loop and kernels; see the module's text
    assert PROCESS.default_steps[sampler] in (20, 25, 50)


def test_the_cosine_schedule_reaches_diffusers_with_its_exact_betas(model):
    cosine = GaussianProcess(noise_schedule="cosine")
    labels, seeds = torch.tensor([2]), [9]
    ours = sample_latents(model, cosine, labels, seeds, SamplingSpec("unipc", 5, cfg_scale=1.0))
    scheduler = UniPCMultistepScheduler(num_train_timesteps=1000, prediction_type="epsilon",
                                        trained_betas=cosine.diffusion.betas.tolist())
    assert_fp32_close(ours, _diffusers_loop(scheduler, model, labels, seeds, 5, False), rel=LOOP_REL)


@pytest.mark.parametrize("sampler", STOCHASTIC)
def test_stochastic_samplers_draw_each_images_noise_from_its_own_generator(model, sampler):
    """Under guidance (the batch doubled inside the denoiser, one row per image in the sampler)."""
    labels, seeds = torch.tensor([2, 3, 8]), [11, 12, 13]
    spec = SamplingSpec(sampler, 5, cfg_scale=4.0)
    batch = sample_latents(model, PROCESS, labels, seeds, spec)
    for i in range(3):
        alone = sample_latents(model, PROCESS, labels[i:i + 1], seeds[i:i + 1], spec)
        assert_fp32_close(alone[0], batch[i], rel=LOOP_REL)  # a row alone against the batch: see the module
    # The step noise matters: the deterministic dpm++ from the same x_T ends elsewhere.
    deterministic = sample_latents(model, PROCESS, labels, seeds, SamplingSpec("dpm++", 5, cfg_scale=4.0))
    assert (deterministic - batch).abs().max() > 1e-2


def test_official_ddim_is_diffusers_ddim_on_the_respaced_schedule(model):
    """The official DDIM respaces "10" to timesteps 0, 111, ..., 999 (diffusers' DDIM steps back by 1000 // 10
    and cannot take those timesteps): diffusers' DDIMScheduler on the respaced process (its 10 betas, every
    step, final alpha_bar 1, no clipping) with the model fed the official timesteps is the same sampler."""
    labels, seeds = torch.tensor([0, 5]), [21, 22]
    respaced = create_diffusion("10")
    official_t = torch.tensor(respaced.timestep_map)
    assert official_t.tolist() == [round(i * 111) for i in range(10)]
    ours = sample_latents(model, PROCESS, labels, seeds, SamplingSpec("ddim", 10, cfg_scale=1.0))
    scheduler = DDIMScheduler(num_train_timesteps=10, trained_betas=respaced.betas.tolist(), clip_sample=False,
                              set_alpha_to_one=True, steps_offset=0, timestep_spacing="leading")
    reference = _diffusers_loop(scheduler, model, labels, seeds, 10, False, time_of=lambda t: official_t[t])
    assert_fp32_close(ours, reference, rel=LOOP_REL)


def test_official_ddim_is_diffusers_ddim_at_every_step(model):
    """At 1000 steps every spacing takes every timestep: DiT's schedule in diffusers' DDIMScheduler as is."""
    labels, seeds = torch.tensor([4]), [31]
    ours = sample_latents(model, PROCESS, labels, seeds, SamplingSpec("ddim", 1000, cfg_scale=1.0))
    reference = _diffusers_loop(SCHEDULERS["ddim-hf"](), model, labels, seeds, 1000, False)
    assert_fp32_close(ours, reference, rel=LOOP_REL)


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_sample_ddp_with_euler_a_is_byte_identical_for_1_and_2_processes(tmp_path):
    save_model(tmp_path / "tiny.pt", tiny_dit(**PIXEL))
    name = "tiny-euler-a5-cfg1.5-seed11-n6.npz"
    for nproc in (1, 2):
        run_cli(["sample_ddp.py", "--ckpt", str(tmp_path / "tiny.pt"), "--sampler", "euler-a",
                 "--num-sampling-steps", "5", "--vae", "none", "--device", "cpu", "--num-fid-samples", "6",
                 "--per-proc-batch-size", "2", "--global-seed", "11", "--sample-dir", str(tmp_path / f"p{nproc}")],
                nproc=nproc)
    assert _sha(tmp_path / "p1" / name) == _sha(tmp_path / "p2" / name)
