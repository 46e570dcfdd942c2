"""Our Gaussian diffusion beyond the reference vectors: respacing, schedules, per-sample seeds."""

import numpy as np
import pytest
import torch
from helpers import tiny_dit
from helpers.tolerance import LOOP_REL, assert_fp32_close

from diffusion import create_diffusion, space_timesteps
from diffusion.gaussian_diffusion import get_named_beta_schedule


@pytest.mark.parametrize("spec, count", [("250", 250), ("ddim50", 50), ("10,10,10", 30), ("", 1000), (None, 1000)])
def test_respacing_step_counts(spec, count):
    d = create_diffusion(spec)
    assert d.num_timesteps == count
    assert d.timestep_map[0] == 0 and d.timestep_map == sorted(d.timestep_map)


def test_ddim_spacing_is_an_integer_stride():
    assert space_timesteps(1000, "ddim50") == set(range(0, 1000, 20))
    assert space_timesteps(1000, "10,10,10") >= {0, 333, 334, 999}


def test_respaced_alphas_cumprod_are_a_subset():
    full, spaced = create_diffusion(""), create_diffusion("25")
    np.testing.assert_allclose(spaced.alphas_cumprod, full.alphas_cumprod[spaced.timestep_map], rtol=1e-12)


@pytest.mark.parametrize("spec, message", [("ddim999", "integer stride"), ("2000", "cannot be respaced"),
                                           ("ten", "cannot read"), ("0", "cannot be respaced")])
def test_bad_respacing_is_explained(spec, message):
    with pytest.raises(ValueError, match=message):
        create_diffusion(spec)


def test_schedules():
    linear = get_named_beta_schedule("linear", 1000)
    assert linear[0] == pytest.approx(1e-4) and linear[-1] == pytest.approx(0.02)
    cosine = get_named_beta_schedule("cosine", 1000)
    assert cosine.max() <= 0.999 and (np.diff(cosine) >= 0).all()
    with pytest.raises(ValueError, match="unknown noise schedule"):
        get_named_beta_schedule("sigmoid", 10)


def test_rescaled_vb_and_fixed_variance_losses():
    model = tiny_dit().eval()
    x0, t, y = torch.randn(2, 4, 8, 8), torch.tensor([3, 400]), torch.tensor([1, 2])
    noise = torch.randn_like(x0)
    plain = create_diffusion("", diffusion_steps=500).training_losses(model, x0, t, dict(y=y), noise)
    rescaled = create_diffusion("", diffusion_steps=500, rescale_learned_sigmas=True).training_losses(
        model, x0, t, dict(y=y), noise)
    torch.testing.assert_close(rescaled["vb"], plain["vb"] * 0.5)
    fixed = tiny_dit(learn_sigma=False).eval()
    terms = create_diffusion("", learn_sigma=False).training_losses(fixed, x0, t, dict(y=y), noise)
    assert "vb" not in terms and torch.equal(terms["loss"], terms["mse"])
    kl = create_diffusion("", use_kl=True).training_losses(model, x0, t, dict(y=y), noise)
    assert torch.isfinite(kl["loss"]).all()


@pytest.mark.parametrize("sampler", ["p_sample_loop", "ddim_sample_loop"])
def test_per_sample_generators_make_samples_batch_independent(sampler):
    model = tiny_dit().eval()
    diffusion = create_diffusion("5")
    kwargs = dict(eta=1.0) if sampler == "ddim_sample_loop" else {}

    def run(seeds, labels):
        gens = [torch.Generator().manual_seed(s) for s in seeds]
        return getattr(diffusion, sampler)(model, (len(seeds), 4, 8, 8), model_kwargs=dict(y=torch.tensor(labels)),
                                           generator=gens, **kwargs)

    together = run([11, 12, 13], [1, 2, 3])
    alone = run([12], [2])
    assert_fp32_close(alone, together[1:2], rel=LOOP_REL)  # 5 steps, each batched differently
    assert not torch.allclose(together[0], together[2])


def test_progress_bar_and_guided_sampling_run_on_a_bound_method():
    model = tiny_dit().eval()
    diffusion = create_diffusion("3")
    z = torch.randn(2, 4, 8, 8)
    kwargs = dict(y=torch.tensor([1, 2, 10, 10]), cfg_scale=2.0)
    out = diffusion.ddim_sample_loop(model.forward_with_cfg, (4, 4, 8, 8), torch.cat([z, z]), model_kwargs=kwargs,
                                     progress=True)
    # deterministic: both halves carry the guided channels (the official code guides the first 3)
    torch.testing.assert_close(out[:2, :3], out[2:, :3])
    out = diffusion.ddim_sample_loop(model.forward_with_cfg, (4, 4, 8, 8), torch.cat([z, z]),
                                     model_kwargs=dict(kwargs, guide_all_channels=True))
    torch.testing.assert_close(out[:2], out[2:])
