"""MAR and its diffusion loss against the official code (tests/data/mar_tiny), the registry's official
sizes, and sampling as a function of per-image seeds.

The reference folder stores every random draw of the official run as an input (README there). Draws
made inside the ADM sampler (`p_sample`'s noise) and the starting noise of `DiffLoss.sample` all go
through `diffusion.gaussian_diffusion._randn_like`; `_replay` feeds the stored ones through it.
"""

from __future__ import annotations

import json
import re
from contextlib import contextmanager
from pathlib import Path
from unittest.mock import patch

import numpy as np
import pytest
import torch
from helpers.tolerance import KERNEL_REL, assert_fp32_close

from diffusion import gaussian_diffusion as gd
from models.mar import MAR, MAR_CFG_SCALES, MAR_models, mask_by_order

REFERENCE = Path(__file__).resolve().parent / "data" / "mar_tiny"
EXACT = dict(atol=0, rtol=0)


@pytest.fixture(scope="module")
def ref():
    from safetensors.torch import load_file

    return {"e": load_file(str(REFERENCE / "expected.safetensors")),
            "config": json.loads((REFERENCE / "config.json").read_text())}


@pytest.fixture(scope="module")
def model(ref):
    config = ref["config"]
    model = MAR(**config["model_config"], norm_eps=config["norm_eps"])
    model.load_state_dict(torch.load(REFERENCE / "mar_tiny.pt", weights_only=True), strict=True)
    return model.eval()


def _close(actual, expected):
    """Float32 kernel rounding, relative to the tensor's largest magnitude (helpers/tolerance.py)."""
    assert_fp32_close(actual, expected)


def _close_scaled(actual, expected):
    """After the t = 999 step values reach ~1e5 on random weights: the same rounding relative to the
    tensor's scale, and per element (the README's rtol 1e-4) where a small value came from a large one."""
    torch.testing.assert_close(actual, expected, atol=KERNEL_REL * expected.abs().max().item(), rtol=1e-4)


@contextmanager
def _replay(draws):
    """Makes every Gaussian draw of the sampler return the next stored tensor (shapes checked)."""
    queue = list(draws)

    def next_draw(x, generator):
        assert queue, "the sampler drew more noise than the official run"
        draw = queue.pop(0)
        assert tuple(draw.shape) == tuple(x.shape), (tuple(draw.shape), tuple(x.shape))
        return draw.clone().to(device=x.device, dtype=x.dtype)

    with patch.object(gd, "_randn_like", next_draw):
        yield
    assert not queue, f"{len(queue)} stored draws were not used"


def _rows(e, key="decoder_out"):
    return e[key].reshape(-1, e[key].shape[-1])  # (N, D_dec), rows (b, l) row-major


# ----------------------------------------------------------------- checkpoint, tokens, backbone

def test_checkpoint_loads_strict_and_config_rebuilds(ref, model):
    assert model.arch == "MAR"
    assert sum(p.numel() for p in model.parameters()) == ref["config"]["param_count"] == 288032
    config = json.loads(json.dumps(model.config))
    # The config rebuilds the model: the runtime switch and the sampler's steps (the process's) are not in it.
    rebuilds = {k: v for k, v in ref["config"]["model_config"].items()
                if k not in ("num_sampling_steps", "grad_checkpointing")}
    assert config == {**rebuilds, "norm_eps": 1e-6}
    rebuilt = MAR(**config)
    rebuilt.load_state_dict(model.state_dict(), strict=True)
    assert all(b.norm1.eps == 1e-6 for b in rebuilt.encoder_blocks) and rebuilt.decoder_norm.eps == 1e-6


def test_patchify_unpatchify_class_embedding(ref, model):
    e = ref["e"]
    torch.testing.assert_close(model.patchify(e["imgs"]), e["patchify"], **EXACT)
    torch.testing.assert_close(model.unpatchify(model.patchify(e["imgs"])), e["unpatchify"], **EXACT)
    with torch.no_grad():
        torch.testing.assert_close(model.class_emb(e["labels"]), e["class_embedding"], **EXACT)


def test_reference_masks_follow_the_orders(ref, model):
    e = ref["e"]
    assert torch.equal(mask_by_order(ref["config"]["num_masked"], e["orders"]).float(), e["mask"])
    assert torch.equal(mask_by_order(12, e["forward_orders"]).float(), e["forward_mask"])
    np.random.seed(0)
    drawn = model.random_masking(model.patchify(e["imgs"]), e["orders"])
    counts = drawn.sum(dim=1)
    assert (counts == counts[0]).all() and counts[0] >= np.ceil(16 * model.mask_ratio_min)


@pytest.mark.parametrize("cond", [True, False])
def test_encoder_decoder(ref, model, cond):
    e = ref["e"]
    class_embedding = model.class_emb(e["labels"]) if cond else model.fake_latent.repeat(4, 1)
    suffix = "" if cond else "_uncond"
    with torch.no_grad():
        enc = model.forward_mae_encoder(model.patchify(e["imgs"]), e["mask"], class_embedding)
        dec = model.forward_mae_decoder(enc, e["mask"])
    _close(enc, e["encoder_out" + suffix])
    _close(dec, e["decoder_out" + suffix])


def test_forward_loss(ref, model):
    e = ref["e"]
    with torch.no_grad():
        loss = model(e["imgs"], e["labels"], orders=e["forward_orders"], mask=e["forward_mask"],
                     diffusion_t=e["forward_t"], diffusion_noise=e["forward_noise"])
    _close(loss, e["forward_loss"])


# ----------------------------------------------------------------- diffusion loss

def test_schedules(ref, model):
    e, dl = ref["e"], model.diffloss
    torch.testing.assert_close(torch.from_numpy(dl.train_diffusion.alphas_cumprod), e["train_alphas_cumprod"],
                               atol=1e-15, rtol=0)
    torch.testing.assert_close(torch.from_numpy(dl.gen_diffusion.alphas_cumprod), e["gen_alphas_cumprod"],
                               atol=1e-15, rtol=0)
    assert dl.gen_diffusion.timestep_map == e["gen_timestep_map"].tolist() == [0, 250, 500, 749, 999]


def test_denoiser_mlp(ref, model):
    e, dl = ref["e"], model.diffloss
    target = _rows(e, "patchify")
    x_t = dl.train_diffusion.q_sample(target, e["diffloss_t"], e["diffloss_noise"])
    _close(x_t, e["diffloss_x_t"])
    with torch.no_grad():
        _close(dl.net.time_embed(e["diffloss_t"]), e["diffloss_time_embed"])
        _close(dl.net(e["diffloss_x_t"], e["diffloss_t"], _rows(e)), e["diffloss_net_out"])
        x, t = e["diffloss_x_t"][:32], e["diffloss_t"][:32]
        c = torch.cat([_rows(e)[:32], _rows(e, "decoder_out_uncond")[:32]])
        guided = dl.net.forward_with_cfg(torch.cat([x, x]), torch.cat([t, t]), c, ref["config"]["run"]["net_cfg_scale"])
    _close(guided, e["diffloss_net_cfg_out"])


def test_training_losses(ref, model):
    e, dl = ref["e"], model.diffloss
    target, z = _rows(e, "patchify"), _rows(e)
    with torch.no_grad():
        terms = dl.train_diffusion.training_losses(dl.net, target, e["diffloss_t"], dict(c=z),
                                                   noise=e["diffloss_noise"])
        masked = dl(target, z, e["mask"].reshape(-1), t=e["diffloss_t"], noise=e["diffloss_noise"])
    _close(terms["mse"], e["diffloss_mse"])
    for key in ("vb", "loss"):  # several hundred bits at t = 999 (untrained variance head)
        _close(terms[key], e[f"diffloss_{key}"])
    _close(masked, e["diffloss_masked_loss"])


def test_respaced_steps_and_temperature(ref, model):
    e, dl = ref["e"], model.diffloss
    z, x = _rows(e), e["gen_x"]
    temperature = ref["config"]["run"]["p_sample_temperature"]
    for i in range(5):
        t = torch.full((64,), i, dtype=torch.long)
        with torch.no_grad():
            out = dl.gen_diffusion.p_mean_variance(dl.net, x, t, clip_denoised=False, model_kwargs=dict(c=z))
            with _replay([e["gen_p_sample_noise"][i]]):
                sample = dl.gen_diffusion.p_sample(dl.net, x, t, clip_denoised=False, model_kwargs=dict(c=z),
                                                   temperature=temperature)["sample"]
        close = _close if i < 4 else _close_scaled  # step 4 is t = 999
        for key in ("mean", "log_variance", "pred_xstart"):
            close(out[key], e[f"gen_{key}"][i])
        close(sample, e["gen_p_sample"][i])


def test_temperature_one_is_the_plain_step(ref, model):
    e, dl = ref["e"], model.diffloss
    t = torch.full((64,), 2, dtype=torch.long)
    kwargs = dict(clip_denoised=False, model_kwargs=dict(c=_rows(e)))
    with torch.no_grad():
        plain = dl.gen_diffusion.p_sample(dl.net, e["gen_x"], t, generator=torch.Generator().manual_seed(0),
                                          **kwargs)["sample"]
        one = dl.gen_diffusion.p_sample(dl.net, e["gen_x"], t, generator=torch.Generator().manual_seed(0),
                                        temperature=1.0, **kwargs)["sample"]
    torch.testing.assert_close(one, plain, **EXACT)


def test_diffloss_sample(ref, model):
    e, run, dl = ref["e"], ref["config"]["run"], model.diffloss
    with _replay(e["diffloss_sample_step_noise"]):
        sampled = dl.sample(_rows(e), temperature=run["sample_temperature"], cfg=run["sample_cfg"],
                            noise=e["diffloss_sample_noise"])
    _close_scaled(sampled, e["diffloss_sample"])

    z = torch.cat([_rows(e)[:32], _rows(e, "decoder_out_uncond")[:32]])
    with _replay(e["diffloss_sample_cfg_step_noise"]):
        guided = dl.sample(z, temperature=run["sample_cfg_temperature"], cfg=run["sample_cfg_cfg"],
                           noise=e["diffloss_sample_cfg_noise"])
    _close_scaled(guided, e["diffloss_sample_cfg"])


def test_diffloss_sample_draws_its_start_noise_first(ref, model):
    """Without `noise`, the start noise is the first draw, as in the official code."""
    e, dl = ref["e"], model.diffloss
    with _replay([e["diffloss_sample_noise"], *e["diffloss_sample_step_noise"]]):
        sampled = dl.sample(_rows(e))
    _close_scaled(sampled, e["diffloss_sample"])


# ----------------------------------------------------------------- sample_tokens

@pytest.mark.parametrize("prefix,run", [("tokens", "tokens_run"), ("tokens_cfg", "tokens_cfg_run")])
def test_sample_tokens(ref, model, prefix, run):
    e, settings = ref["e"], ref["config"]["run"][run]
    draws = []
    for k in range(settings["num_iter"]):
        draws += [e[f"{prefix}_noise_init_{k}"], *e[f"{prefix}_noise_steps_{k}"]]
    calls, original = [], model.diffloss.sample

    def record(z, temperature, cfg, **kwargs):
        out = original(z, temperature, cfg, **kwargs)
        calls.append((z, cfg, out))
        return out

    with patch.object(model.diffloss, "sample", record), _replay(draws):
        out = model.sample_tokens(4, num_iter=settings["num_iter"], cfg=settings["cfg"],
                                  cfg_schedule=settings["cfg_schedule"], labels=e["tokens_labels"],
                                  temperature=settings["temperature"], orders=e["tokens_orders"])
    assert len(calls) == settings["num_iter"]
    cfgs = torch.tensor([cfg for _, cfg, _ in calls], dtype=torch.float32)
    torch.testing.assert_close(cfgs, e[f"{prefix}_step_cfg"], **EXACT)
    for k, (z, _, sampled) in enumerate(calls):
        _close(z, e[f"{prefix}_step_z_{k}"])
        _close_scaled(sampled, e[f"{prefix}_step_sampled_{k}"])
    _close_scaled(out, e[f"{prefix}_out"])


# ----------------------------------------------------------------- registry

def _official_param_count(width: int, depth: int, diffloss_w: int, diffloss_d: int, tokens: int = 16,
                          seq_len: int = 256, buffer: int = 64, classes: int = 1000) -> int:
    """Parameters of the official MAR, from its layers (256 px, VAE stride 16, patch 1, 1000 classes)."""
    D, W, C = width, diffloss_w, tokens
    block = 12 * D * D + 13 * D  # timm Block, mlp_ratio 4: norms, qkv, proj, fc1, fc2
    encoder = classes * D + D + (C * D + D) + 2 * D + (seq_len + buffer) * D + depth * block + 2 * D
    decoder = (D * D + D) + D + (seq_len + buffer) * D + depth * block + 2 * D + seq_len * D
    res_block = 2 * W + 2 * (W * W + W) + (3 * W * W + 3 * W)
    mlp = ((256 * W + W) + (W * W + W) + (D * W + W) + (C * W + W) + diffloss_d * res_block
           + (W * 2 * C + 2 * C) + (2 * W * W + 2 * W))
    return encoder + decoder + mlp


# Official module sizes (README: MAR-B 208M, MAR-L 479M, MAR-H 943M, rounded up).
OFFICIAL = {"MAR-B": (768, 12, 12, 1024, 6, 207_924_768), "MAR-L": (1024, 16, 16, 1280, 8, 478_326_304),
            "MAR-H": (1280, 20, 16, 1536, 12, 942_403_104)}


def _layout(keys):
    return {re.sub(r"\.\d+\.", ".N.", k) for k in keys}


@pytest.mark.parametrize("name", list(OFFICIAL))
def test_registry_official_sizes_and_layout(name):
    width, depth, heads, diffloss_w, diffloss_d, count = OFFICIAL[name]
    with torch.device("meta"):
        model = MAR_models[name]()
    params = dict(model.named_parameters())
    assert sum(p.numel() for p in params.values()) == count == _official_param_count(width, depth, diffloss_w,
                                                                                      diffloss_d)
    reference_keys = torch.load(REFERENCE / "mar_tiny.pt", weights_only=True, map_location="meta").keys()
    assert _layout(model.state_dict()) == _layout(reference_keys)
    assert len(model.encoder_blocks) == len(model.decoder_blocks) == depth
    assert model.encoder_blocks[0].attn.num_heads == heads
    D, W = width, diffloss_w
    shapes = {
        "encoder_pos_embed_learned": (1, 256 + 64, D), "decoder_pos_embed_learned": (1, 256 + 64, D),
        "diffusion_pos_embed_learned": (1, 256, D), "class_emb.weight": (1000, D), "fake_latent": (1, D),
        "mask_token": (1, 1, D), "z_proj.weight": (D, 16),
        "diffloss.net.time_embed.mlp.0.weight": (W, 256), "diffloss.net.cond_embed.weight": (W, D),
        "diffloss.net.input_proj.weight": (W, 16),
        f"diffloss.net.res_blocks.{diffloss_d - 1}.adaLN_modulation.1.weight": (3 * W, W),
        "diffloss.net.final_layer.adaLN_modulation.1.weight": (2 * W, W),
        "diffloss.net.final_layer.linear.weight": (32, W), "diffloss.net.final_layer.linear.bias": (32,),
    }
    for key, shape in shapes.items():
        assert tuple(params[key].shape) == shape, key
    assert f"diffloss.net.res_blocks.{diffloss_d}.in_ln.weight" not in params
    assert model.diffloss.gen_diffusion.num_timesteps == 100
    assert {k: model.config[k] for k in MAR_models[name].fixed} == MAR_models[name].fixed


def test_registry_names():
    assert set(MAR_CFG_SCALES) == {"MAR-B", "MAR-L", "MAR-H"} <= set(MAR_models)
    assert MAR_models["MAR-L"].fixed["norm_eps"] == 1e-6 and MAR_models["MAR-L"].fixed["buffer_size"] == 64
    with pytest.raises(ValueError, match="fixes buffer_size"):
        MAR_models["MAR-B"](buffer_size=32)


# ----------------------------------------------------------------- seeds

TINY = dict(img_size=64, vae_stride=16, patch_size=1, encoder_embed_dim=32, encoder_depth=1, encoder_num_heads=2,
            decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2, class_num=5, attn_dropout=0.0,
            proj_dropout=0.0, buffer_size=2, diffloss_d=1, diffloss_w=32, num_sampling_steps="4")


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = MAR(**TINY).eval()
    with torch.no_grad():  # the zero-initialised layers get values so that the condition matters
        for name, p in model.named_parameters():
            if "adaLN_modulation" in name or "final_layer.linear" in name:
                p.normal_(0, 0.02)
    return model


@pytest.mark.parametrize("cfg", [1.0, 2.0])
def test_sampling_is_a_function_of_per_image_seeds(tiny, cfg):
    def sample(seeds, labels):
        gens = [torch.Generator().manual_seed(s) for s in seeds]
        return tiny.sample_tokens(len(seeds), num_iter=3, cfg=cfg, labels=torch.tensor(labels), generators=gens)

    batch = sample([10, 11, 12], [0, 3, 4])
    alone = sample([11], [3])
    # Other batch sizes round differently (float32), and the t = 999 step amplifies rounding ~2e4 times
    # (values reach ~1e5 on random weights), so the tolerance is relative to the scale.
    assert_fp32_close(alone[0], batch[1])
    torch.testing.assert_close(sample([10, 11, 12], [0, 3, 4]), batch, **EXACT)
    assert not torch.allclose(sample([13], [3])[0], batch[1])


def test_orders_from_generators(tiny):
    gens = [torch.Generator().manual_seed(s) for s in (1, 2)]
    orders = tiny.sample_orders(2, gens)
    assert torch.equal(orders[1], torch.randperm(16, generator=torch.Generator().manual_seed(2)))
    assert torch.equal(orders.sort(dim=1).values, torch.arange(16).expand(2, 16))
    with pytest.raises(ValueError, match="one per image"):
        tiny.sample_tokens(3, num_iter=2, generators=gens)


def test_training_step_draws_internally(ref, tiny):
    """Training mode (label drop, numpy orders, truncated-normal ratio, torch draws) runs, and gradient
    checkpointing changes nothing for the same draws; with the official draws a checkpointed forward is
    the official loss."""
    def count_block_calls(model):  # encoder, decoder and DiffLoss MLP blocks; checkpointing runs each twice
        calls = [0]
        for block in [*model.encoder_blocks, *model.decoder_blocks, *model.diffloss.net.res_blocks]:
            block.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
        return calls

    def step(grad_checkpointing):
        model = MAR(**TINY, grad_checkpointing=grad_checkpointing)
        model.load_state_dict(tiny.state_dict())
        model.train()
        calls = count_block_calls(model)
        np.random.seed(0)
        torch.manual_seed(0)
        loss = model(torch.randn(2, 16, 4, 4), torch.tensor([1, 4]))
        loss.backward()
        return loss, {k: p.grad for k, p in model.named_parameters()}, calls[0]

    plain_loss, plain_grads, plain_calls = step(False)
    loss, grads, calls = step(True)
    assert torch.isfinite(plain_loss)
    assert plain_calls == 1 + 1 + 1 and calls == 2 * plain_calls  # each block recomputed in the backward pass
    torch.testing.assert_close(loss, plain_loss, **EXACT)
    assert grads.keys() == plain_grads.keys()
    assert [k for k, g in grads.items() if g is None] == [k for k, g in plain_grads.items() if g is None]
    for key, grad in grads.items():
        if grad is not None:
            # recomputed activations may round otherwise in the last bits; a missing term is of the gradient's size
            torch.testing.assert_close(grad, plain_grads[key], atol=1e-6, rtol=1e-5, msg=key)  # see above

    # the reference model, checkpointed, with the official forward's draws (test_forward_loss runs it plainly)
    e, config = ref["e"], ref["config"]
    official = MAR(**{**config["model_config"], "grad_checkpointing": True}, norm_eps=config["norm_eps"])
    official.load_state_dict(torch.load(REFERENCE / "mar_tiny.pt", weights_only=True), strict=True)
    official.eval()
    calls = count_block_calls(official)
    loss = official(e["imgs"], e["labels"], orders=e["forward_orders"], mask=e["forward_mask"],
                    diffusion_t=e["forward_t"], diffusion_noise=e["forward_noise"])
    loss.backward()
    assert calls[0] == 2 * (2 + 2 + 2)  # 2 encoder, 2 decoder and 2 MLP blocks, each run twice
    _close(loss.detach(), e["forward_loss"])
