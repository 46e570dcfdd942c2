"""Every tensor of the reference DiT (tests/data/dit_tiny) reproduced through the public loader."""

import torch
import torch.nn.functional as F
from helpers.tolerance import LOOP_REL, assert_fp32_close

from diffusion import create_diffusion
from models import prune_depth
from tinyfusion.checkpoint import load_model


def _model(reference):
    return load_model(reference["ckpt"], "DiT", num_heads=reference["config"]["model_config"]["num_heads"]).model


def test_loader_infers_reference_architecture(reference):
    loaded = load_model(reference["ckpt"], "DiT", num_heads=4)
    assert loaded.weights == "plain"
    config = reference["config"]["model_config"]
    widths = [{"num_heads": config["num_heads"], "head_dim": config["hidden_size"] // config["num_heads"],
               "mlp_hidden": 4 * config["hidden_size"]}] * config["depth"]
    assert loaded.config == config | {"mlp_ratio": 4.0, "block_widths": widths, "attention": {"kind": "global"}}
    assert loaded.process["name"] == "gaussian" and loaded.codec is None
    assert not loaded.model.training


def test_forward_and_guidance(reference):
    e, model = reference["expected"], _model(reference)
    with torch.no_grad():
        assert_fp32_close(model(e["x"], e["t"], e["y"]), e["forward"])
        guided = model.forward_with_cfg(e["x"], e["t"], e["y_cfg"], cfg_scale=4.0)
    assert_fp32_close(guided, e["forward_with_cfg_scale4"])


def test_guidance_on_all_channels_differs_only_beyond_the_third(reference):
    e, model = reference["expected"], _model(reference)
    with torch.no_grad():
        three = model.forward_with_cfg(e["x"], e["t"], e["y_cfg"], cfg_scale=4.0)
        full = model.forward_with_cfg(e["x"], e["t"], e["y_cfg"], cfg_scale=4.0, guide_all_channels=True)
    torch.testing.assert_close(full[:, :3], three[:, :3], atol=0, rtol=0)
    assert not torch.allclose(full[:, 3:4], three[:, 3:4])
    torch.testing.assert_close(full[:, 4:], three[:, 4:], atol=0, rtol=0)  # variance channels unguided


def test_block_outputs_and_bi_scores(reference):
    e, model = reference["expected"], _model(reference)
    io = []
    hooks = [b.register_forward_hook(lambda m, a, o: io.append((a[0], o))) for b in model.blocks]
    with torch.no_grad():
        model(e["x"], e["t"], e["y"])
    for h in hooks:
        h.remove()
    assert_fp32_close(torch.stack([o for _, o in io]), e["block_outputs"])
    bi = torch.stack([1 - F.cosine_similarity(i, o, dim=-1).mean() for i, o in io])
    # 1 - cos keeps the absolute precision of the cosine (magnitude 1), not a relative one: compare cosines.
    assert_fp32_close(1 - bi, 1 - e["bi_score_1_minus_cos"])


def test_pruned_forward(reference):
    e, model = reference["expected"], _model(reference)
    pruned = prune_depth(model, e["kept_indices"].tolist())
    assert len(pruned.blocks) == 2 and pruned.config["depth"] == 2
    with torch.no_grad():
        assert_fp32_close(pruned(e["x"], e["t"], e["y"]), e["pruned_forward"])


def test_q_sample_and_training_losses(reference):
    e, model = reference["expected"], _model(reference)
    diffusion = create_diffusion(timestep_respacing="")
    assert_fp32_close(diffusion.q_sample(e["train_x0"], e["t"], e["train_noise"]), e["q_sample"])
    with torch.no_grad():
        terms = diffusion.training_losses(model, e["train_x0"], e["t"], dict(y=e["y"]), noise=e["train_noise"])
    for key in ("loss", "mse", "vb"):
        assert_fp32_close(terms[key], e[f"train_{key}"])


def test_respaced_posterior(reference):
    e, model = reference["expected"], _model(reference)
    diffusion = create_diffusion(timestep_respacing=reference["config"]["respacing"])
    assert diffusion.num_timesteps == 10
    means, log_vars = [], []
    with torch.no_grad():
        for i in range(10):
            out = diffusion.p_mean_variance(model, e["x"], torch.full((4,), i), clip_denoised=False,
                                            model_kwargs=dict(y=e["y"]))
            means.append(out["mean"])
            log_vars.append(out["log_variance"])
    assert_fp32_close(torch.stack(means), e["respaced10_mean"])
    assert_fp32_close(torch.stack(log_vars), e["respaced10_log_variance"])


def test_ddim_sample(reference):
    e, model = reference["expected"], _model(reference)
    diffusion = create_diffusion(timestep_respacing="10")
    sample = diffusion.ddim_sample_loop(model, e["x"].shape, noise=e["x"], clip_denoised=False,
                                        model_kwargs=dict(y=e["y"]), eta=0.0)
    assert_fp32_close(sample, e["ddim10_sample"], rel=LOOP_REL)
