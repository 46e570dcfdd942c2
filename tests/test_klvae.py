"""MAR's KL-16 codec: LDM's parameter layout read from the file, the posterior and scale, and
extract_features.py writing KL-16 latents that a MAR's checkpoint then records."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import run_cli
from helpers.tolerance import assert_fp32_close
from PIL import Image

from tinyfusion.klvae import KL16_SCALING_FACTOR, AttnBlock, KLAutoencoder, load_kl_autoencoder
from tinyfusion.vae import load_codec, resolve_codec

# A small KL autoencoder of KL-16's shape: 16 latent channels, attention at the last encoder level,
# stride 2 here (two levels) instead of 16 (five).
SMALL = dict(embed_dim=16, ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_levels=(1,))


@pytest.fixture(scope="module")
def kl16_file(tmp_path_factory):
    torch.manual_seed(0)
    vae = KLAutoencoder(**SMALL)
    path = tmp_path_factory.mktemp("vae") / "kl16.ckpt"
    # the released file holds the weights under "model", beside the training loss's tensors
    torch.save({"model": {**vae.state_dict(), "loss.logvar": torch.zeros(())}}, path)
    return path, vae


def test_the_layout_is_ldms_and_the_sizes_come_from_the_weights(kl16_file):
    path, vae = kl16_file
    keys = set(vae.state_dict())
    for key in ("encoder.conv_in.weight", "encoder.down.0.block.0.norm1.weight",
                "encoder.down.0.downsample.conv.weight", "encoder.down.1.block.0.nin_shortcut.weight",
                "encoder.down.1.attn.0.q.weight", "encoder.mid.attn_1.proj_out.weight",
                "encoder.mid.block_2.conv2.bias", "encoder.norm_out.weight", "decoder.conv_in.weight",
                "decoder.up.0.block.1.conv1.weight", "decoder.up.0.block.0.nin_shortcut.weight",
                "decoder.up.1.upsample.conv.weight", "decoder.mid.attn_1.k.weight", "quant_conv.weight",
                "post_quant_conv.weight"):
        assert key in keys, key
    assert not any(k.startswith("decoder.up.") and ".attn." in k for k in keys)  # the decoder attends in the middle
    assert "encoder.down.0.attn.0.q.weight" not in keys
    assert KLAutoencoder.config_from_state_dict(vae.state_dict()) == {**SMALL, "ch_mult": (1, 2), "attn_levels": (1,)}
    loaded = load_kl_autoencoder(path)
    assert all(torch.equal(v, vae.state_dict()[k]) for k, v in loaded.state_dict().items())
    with torch.device("meta"):
        official = KLAutoencoder()
    assert official.downsample == 16 and official.embed_dim == 16


def test_attention_is_softmax_over_pixels_with_one_head():
    torch.manual_seed(1)
    block = AttnBlock(32)
    x = torch.randn(2, 32, 3, 4)
    y = block.norm(x)
    q, k, v = (proj(y).flatten(2) for proj in (block.q, block.k, block.v))  # (b, c, hw)
    weights = torch.softmax(torch.bmm(q.transpose(1, 2), k) / math.sqrt(32), dim=2)  # (b, hw_q, hw_k)
    expected = x + block.proj_out(torch.bmm(v, weights.transpose(1, 2)).reshape(2, 32, 3, 4))
    assert_fp32_close(block(x), expected)  # the same operations, other matmul shapes: kernel rounding only


def test_the_codec_samples_the_posterior_and_scales_by_0_2325(kl16_file):
    path, vae = kl16_file
    codec = load_codec(str(path))
    assert codec.scaling_factor == KL16_SCALING_FACTOR and codec.latent_channels() == 16 and codec.downsample == 2
    images = torch.rand(2, 3, 8, 8) * 2 - 1
    g = [torch.Generator().manual_seed(s) for s in (3, 4)]
    latents = codec.encode(images, generator=g)
    with torch.no_grad():
        mean, logvar = vae.quant_conv(vae.encoder(images)).chunk(2, dim=1)
        std = torch.exp(0.5 * logvar.clamp(-30, 20))
    noise = torch.stack([torch.randn(16, 4, 4, generator=torch.Generator().manual_seed(s)) for s in (3, 4)])
    torch.testing.assert_close(latents, (mean + std * noise) * 0.2325)
    decoded = codec.decode(latents)
    with torch.no_grad():
        torch.testing.assert_close(decoded, vae.decoder(vae.post_quant_conv(latents / 0.2325)))
    assert decoded.shape == (2, 3, 8, 8)
    assert resolve_codec(None, None, 16)[0] == "kl16"


def test_a_missing_or_foreign_file_is_one_clear_error(tmp_path):
    with pytest.raises(ValueError, match="download MAR's kl16.ckpt .*pretrained_models/vae/kl16.ckpt"):
        load_codec(str(tmp_path / "kl16.ckpt"))
    torch.save({"model": {"conv.weight": torch.zeros(1)}}, tmp_path / "other.ckpt")
    with pytest.raises(ValueError, match="not a KL autoencoder of LDM's layout"):
        load_codec(str(tmp_path / "other.ckpt"))


def test_extract_features_writes_kl16_latents(kl16_file, tmp_path):
    path, _ = kl16_file
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        (tmp_path / "data" / name).mkdir(parents=True)
        for i in range(2):
            image = rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)
            Image.fromarray(image).save(tmp_path / "data" / name / f"{i}.png")
    run_cli(["extract_features.py", "--data-path", str(tmp_path / "data"), "--features-path", str(tmp_path / "f"),
             "--vae", str(path), "--image-size", "8", "--no-flip", "--num-workers", "0"])
    index = json.loads((tmp_path / "f" / "index.json").read_text())
    assert index["source"]["scaling_factor"] == pytest.approx(0.2325) and index["source"]["vae"] == str(path)
    from tinyfusion.features import FeatureDataset

    data = FeatureDataset(tmp_path / "f")
    assert data.latent_shape == (16, 4, 4)
    x, _ = data[(0, 0)]
    assert torch.isfinite(x).all() and F.mse_loss(x, torch.zeros_like(x)) > 0
