"""MAR through the whole pipeline: its masked-token process on the seam, official checkpoints, and every
script on a tiny pixel-space MAR (two block stacks, the diffusion head's predictions distilled)."""

import argparse
import json
import math

import numpy as np
import pytest
import torch
from helpers import interrupt_with_sigterm, run_cli, tiny_dit, tiny_mar, train_teacher
from helpers.tolerance import assert_fp32_close

from models import MAR, create_model, prune_depth
from processes import MaskedTokenProcess, create_process
from processes.masked import truncated_normal
from tinyfusion.checkpoint import load_model, read_checkpoint, save_model
from tinyfusion.sampling import SamplingSpec, sample_latents

CPU = torch.device("cpu")

#################################################################################
#                                  The process                                  #
#################################################################################


def _process(model: MAR) -> MaskedTokenProcess:
    return create_process(MAR.default_process(model.config))


def test_the_process_loss_is_the_official_loss_at_the_same_draws():
    model = tiny_mar().eval()
    process = _process(model)
    # the config does not carry the sampler's steps (a setting of the process): the official default
    assert process.record() == {"name": "masked-tokens", "patch_size": 2, "mask_ratio_min": 0.7,
                                "diffusion_batch_mul": 2, "num_sampling_steps": 100, "noise_schedule": "cosine",
                                "diffusion_steps": 1000}
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(3, 3, 8, 8, generator=g), torch.tensor([1, 4, 7])
    draws = process.draw(g, 3, model.data_shape, CPU)
    B, L, C, mul = 3, model.seq_len, model.token_embed_dim, model.diffusion_batch_mul
    assert draws["t"].shape == (B, mul * L) and draws["noise"].shape == (B, mul * L, C)
    assert all(sorted(row.tolist()) == list(range(L)) for row in draws["orders"])
    with torch.no_grad():
        ours = process.training_losses(model, x, draws, dict(y=y))
        # The official loss draws its rows as k * B * L + b * L + l; ours are per image, row k * L + l.
        official = model(x, y, mask=process.mask(draws),
                         diffusion_t=draws["t"].reshape(B, mul, L).transpose(0, 1).reshape(-1),
                         diffusion_noise=draws["noise"].reshape(B, mul, L, C).transpose(0, 1).reshape(-1, C))
    assert ours["loss"].shape == (3,)
    assert_fp32_close(ours["loss"].mean(), official)  # the same rows summed in another order
    torch.testing.assert_close(ours["loss"], ours["mse"] + ours["vb"])


def test_draws_mask_one_count_per_step_from_the_truncated_gaussian():
    process = MaskedTokenProcess(patch_size=1)
    counts = [int(process.draw(torch.Generator().manual_seed(s), 4, (16, 8, 8), CPU)["num_masked"].unique())
              for s in range(200)]
    assert min(counts) >= math.ceil(0.7 * 64) and max(counts) <= 64
    assert np.mean(counts) / 64 == pytest.approx(0.8746, abs=0.02)  # E[ceil(64 r) / 64], r of mean 0.867
    # the inverse CDF is scipy's truncnorm((0.7 - 1) / 0.25, 0, loc=1, scale=0.25) of the official code
    import scipy.stats

    u = torch.linspace(0, 1, 11, dtype=torch.float64)
    official = scipy.stats.truncnorm((0.7 - 1.0) / 0.25, 0, loc=1.0, scale=0.25).ppf(u.numpy())
    torch.testing.assert_close(truncated_normal(u, 0.7, 1.0, 1.0, 0.25), torch.from_numpy(official))
    a = process.draw(torch.Generator().manual_seed(3), 4, (16, 8, 8), CPU)
    b = process.draw(torch.Generator().manual_seed(3), 4, (16, 8, 8), CPU)
    assert all(torch.equal(a[k], b[k]) for k in a)
    uneven = dict(a, num_masked=torch.tensor([50, 50, 51, 50]))
    with pytest.raises(ValueError, match="as many tokens"):
        process.mask(uneven)


def test_distillation_compares_the_heads_predictions_on_masked_tokens_only():
    teacher = tiny_mar().eval()
    process = _process(teacher)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(2, 3, 8, 8, generator=g), torch.tensor([2, 3])
    draws = process.draw(g, 2, teacher.data_shape, CPU)
    with torch.no_grad():
        same = process.predict(teacher, x, draws, dict(y=y))
        student = prune_depth(teacher, [0, 3]).eval()
        pruned = process.predict(student, x, draws, dict(y=y))
    # the KL of a Gaussian with itself: zero up to the rounding of log-variances of order 1 (eps 1.2e-7)
    torch.testing.assert_close(process.distillation_loss(same, same), torch.zeros(2), atol=1e-7, rtol=0)  # see above
    kd = process.distillation_loss(pruned, same)
    assert (kd > 0).all()
    # rows of visible tokens do not count: changing the student there changes nothing
    visible = pruned.weight == 0
    assert visible.any()
    edited = type(pruned)(output=pruned.output.masked_fill(visible[..., None], 7.0), x_t=pruned.x_t, t=pruned.t,
                          weight=pruned.weight)
    torch.testing.assert_close(process.distillation_loss(edited, same), kd)


def test_label_dropout_of_the_step_replaces_the_class_by_the_fake_latent():
    model = tiny_mar().eval()
    process = _process(model)
    g = torch.Generator().manual_seed(2)
    x, draws = torch.randn(2, 3, 8, 8, generator=g), process.draw(g, 2, model.data_shape, CPU)
    with torch.no_grad():
        dropped = process.predict(model, x, draws, dict(y=torch.tensor([1, 2]), force_drop_ids=torch.tensor([1, 0])))
        other_class = process.predict(model, x, draws, dict(y=torch.tensor([5, 2]),
                                                            force_drop_ids=torch.tensor([1, 0])))
        kept = process.predict(model, x, draws, dict(y=torch.tensor([1, 2])))
    torch.testing.assert_close(dropped.output, other_class.output, atol=0, rtol=0)  # the label is gone
    assert not torch.equal(dropped.output[0], kept.output[0]) and torch.equal(dropped.output[1], kept.output[1])


@pytest.mark.parametrize("cfg", [1.0, 2.5])
def test_sampling_through_the_seam_is_the_models_loop_and_a_function_of_per_image_seeds(cfg):
    model = tiny_mar().eval()
    process = create_process({**MAR.default_process(model.config), "num_sampling_steps": model.num_sampling_steps})
    spec = SamplingSpec.for_process(process, sampler=None, num_steps=None, options={"num_iter": 3}, cfg_scale=cfg)
    assert (spec.sampler, spec.num_steps) == ("mar", 4)
    assert spec.options == {"num_iter": 3, "cfg_schedule": "linear", "temperature": 1.0}
    labels = torch.tensor([1, 4, 7])
    together = sample_latents(model, process, labels, [5, 6, 7], spec)
    alone = sample_latents(model, process, labels[1:2], [6], spec)
    assert together.shape == (3, 3, 8, 8)
    scale = together[1].abs().max()
    torch.testing.assert_close(alone[0], together[1], atol=1e-4 * scale, rtol=1e-4)
    direct = model.sample_tokens(3, num_iter=3, cfg=cfg, labels=labels,
                                 generators=[torch.Generator().manual_seed(s) for s in (5, 6, 7)])
    torch.testing.assert_close(together, direct, atol=0, rtol=0)
    with pytest.raises(ValueError, match="--num-iter must be at least 1"):
        SamplingSpec.for_process(process, sampler="mar", num_steps=4, options={"num_iter": 0})
    with pytest.raises(ValueError, match="--atol: not an option of the masked-tokens process"):
        SamplingSpec.for_process(process, sampler="mar", num_steps=4, options={"atol": 1e-3})


#################################################################################
#                              Official checkpoints                             #
#################################################################################

def _official_layout_mar(seed: int) -> MAR:
    """A small MAR in the official layout's conventions (KL-16 tokens, stride 16, buffer 64)."""
    torch.manual_seed(seed)
    return MAR(img_size=64, vae_stride=16, patch_size=1, encoder_embed_dim=32, encoder_depth=2, encoder_num_heads=2,
               decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2, class_num=10, buffer_size=64,
               diffloss_d=1, diffloss_w=32)


def test_an_official_checkpoint_loads_strict_and_prefers_the_ema(tmp_path):
    model, ema = _official_layout_mar(0), _official_layout_mar(1)
    path = tmp_path / "checkpoint-last.pth"
    torch.save({"model": model.state_dict(), "model_ema": ema.state_dict(), "optimizer": {"state": {}},
                "epoch": 399, "args": argparse.Namespace(model="mar_base", vae_stride=16)}, path)
    loaded = load_model(path, num_heads=2)
    assert loaded.arch == "MAR" and loaded.weights == "ema" and loaded.process["name"] == "masked-tokens"
    assert loaded.config["encoder_depth"] == 2 and loaded.config["decoder_depth"] == 1
    assert loaded.config["img_size"] == 64 and loaded.config["buffer_size"] == 64
    for k, v in loaded.model.state_dict().items():
        assert torch.equal(v, ema.state_dict()[k]), k
    assert load_model(path, num_heads=2, weights="model").weights == "model"
    assert torch.equal(load_model(path, num_heads=2, weights="model").model.fake_latent, model.fake_latent)

    state = dict(ema.state_dict(), extra_tensor=torch.zeros(1))
    torch.save({"model_ema": state, "model": model.state_dict()}, tmp_path / "extra.pth")
    with pytest.raises(ValueError, match="unexpected \\(1\\): extra_tensor"):
        load_model(tmp_path / "extra.pth", "MAR", num_heads=2)


def test_a_dit_file_given_a_mar_name_is_a_clear_error(tmp_path):
    dit = tiny_dit()
    torch.save(dit.state_dict(), tmp_path / "dit.pt")
    with pytest.raises(ValueError, match="names a MAR, but .*dit.pt does not hold one .*DiT's or SiT's"):
        load_model(tmp_path / "dit.pt", "MAR-L")
    save_model(tmp_path / "dit-toolkit.pt", dit)
    with pytest.raises(ValueError, match="--model MAR-L is a MAR, but .* holds a DiT"):
        load_model(tmp_path / "dit-toolkit.pt", "MAR-L")
    # and the reverse: a MAR file is no DiT
    torch.save(_official_layout_mar(0).state_dict(), tmp_path / "mar.pth")
    with pytest.raises(ValueError, match="names a DiT, but"):
        load_model(tmp_path / "mar.pth", "DiT-XL/2")


def test_training_from_scratch_takes_the_generic_sizes():
    model = create_model("MAR-Nano", input_size=8, in_channels=3, num_classes=10)
    assert model.data_shape == (3, 8, 8) and model.num_classes == 10 and model.seq_len == 16
    with torch.device("meta"):
        assert create_model("MAR-L", input_size=16).config["img_size"] == 256
        assert MAR.default_cfg_scale(create_model("MAR-B", input_size=4).config) == 2.9


#################################################################################
#                                Through the CLI                                #
#################################################################################

@pytest.fixture(scope="module")
def mar(tmp_path_factory):
    """A tiny MAR (2 encoder + 2 decoder blocks) trained by train.py on class patterns in pixel space."""
    return train_teacher(tmp_path_factory.mktemp("mar"), tiny_mar(randomize=False), max_steps=60,
                         codec={"vae": "none", "scaling_factor": 1.0})


def test_train_py_trains_a_mar_with_the_diffusion_loss(mar):
    assert mar["losses"][-1] < 0.8 * mar["losses"][0]
    loaded = load_model(mar["teacher"])
    assert loaded.arch == "MAR" and loaded.process["name"] == "masked-tokens"


def test_prune_both_stacks_distil_and_sample_a_mar(mar, tmp_path):
    data, teacher = str(mar["data"]), str(mar["teacher"])
    common = ["--data-path", data, "--results-dir", str(tmp_path), "--global-batch-size", "16", "--num-workers", "0",
              "--log-every", "1"]
    run_cli(["prune_by_learning.py", "--load-weight", teacher, "--groups", "encoder=1:2", "decoder=1:2", "--delta-w",
             "--lora", "--max-steps", "6", "--prefix", "prune", "--save-model", str(tmp_path / "pruned.pt"), *common])
    pruned = load_model(tmp_path / "pruned.pt")
    kept = pruned.lineage["kept_indices"]
    assert pruned.arch == "MAR" and len(kept) == 2 and kept[0] in (0, 1) and kept[1] in (2, 3)
    assert pruned.config["encoder_depth"] == pruned.config["decoder_depth"] == 1

    run_cli(["prune_by_index.py", "--ckpt", teacher, "--kept-indices", "encoder=1", "decoder=0",
             "--save-model", str(tmp_path / "index.pt")])
    by_index = load_model(tmp_path / "index.pt")
    assert by_index.lineage["kept_indices"] == [1, 2]
    torch.testing.assert_close(by_index.model.decoder_blocks[0].mlp.fc1.weight,
                               load_model(teacher).model.decoder_blocks[0].mlp.fc1.weight, atol=0, rtol=0)

    run_cli(["prune_by_score.py", "--ckpt", teacher, "--criterion", "bi", "--data-path", data, "--num-batches", "2",
             "--batch-size", "8", "--target-depth", "encoder=1", "decoder=1", "--save-model",
             str(tmp_path / "bi.pt")])
    bi = json.loads((tmp_path / "bi.scores.json").read_text())
    assert len(bi["scores"]) == 4 and all(s > 0 for s in bi["scores"])
    assert load_model(tmp_path / "bi.pt").config["encoder_depth"] == 1  # one block of each stack kept

    # 60 steps: on an idle machine a tiny MAR takes several steps between the second log line and the signal
    kd_args = ["train_masked_kd.py", "--load-weight", str(tmp_path / "pruned.pt"), "--load-teacher", teacher,
               "--max-steps", "60", "--lr", "1e-3", "--ckpt-every", "1000", *common]
    run_cli([*kd_args, "--prefix", "kd", "--save-model", str(tmp_path / "kd.pt")])
    records = [json.loads(line) for line in (tmp_path / "kd" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["kd"] > 0 and r["feat"] > 0 and np.isfinite(r["gt"]) for r in records)
    # an interrupted and resumed distillation equals the straight one
    interrupt_with_sigterm([*kd_args, "--prefix", "resumed"], tmp_path / "resumed" / "metrics.jsonl", after_lines=2)
    stopped = read_checkpoint(sorted((tmp_path / "resumed" / "checkpoints").glob("*.pt"))[-1])
    assert 2 <= stopped["training_state"]["step"] < 60
    run_cli([*kd_args, "--prefix", "resumed"])
    straight, resumed = (read_checkpoint(tmp_path / p / "checkpoints" / "step-0000060.pt")["model"]
                         for p in ("kd", "resumed"))
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)

    outputs = {}
    for nproc, batch in ((1, 4), (2, 2)):
        npz = tmp_path / f"samples-{nproc}.npz"
        run_cli(["sample_ddp.py", "--ckpt", str(tmp_path / "kd.pt"), "--num-fid-samples", "6", "--per-proc-batch-size",
                 str(batch), "--num-iter", "4", "--sample-dir", str(tmp_path / f"samples-{nproc}"), "--npz", str(npz)],
                nproc=nproc)
        outputs[nproc] = np.load(npz)["arr_0"]
        protocol = json.loads(npz.with_suffix(".json").read_text())
        assert protocol["sampler"] == "mar" and protocol["sampler_options"]["num_iter"] == 4
        assert protocol["cfg_scale"] == 3.0 and protocol["process"]["name"] == "masked-tokens"
    np.testing.assert_array_equal(outputs[1], outputs[2])
    assert outputs[1].shape == (6, 8, 8, 3)

    from tinyfusion.evaluation import SmallClassifier, save_feature_extractor
    save_feature_extractor(tmp_path / "fx.pt", SmallClassifier(image_size=8, num_classes=10, width=4), name="toy")
    np.savez(tmp_path / "ref.npz", arr_0=np.concatenate([outputs[1]] * 2))
    run_cli(["evaluator.py", str(tmp_path / "ref.npz"), str(tmp_path / "samples-2.npz"), "--feature-extractor",
             str(tmp_path / "fx.pt"), "--out", str(tmp_path / "fid.json")])
    metrics = json.loads((tmp_path / "fid.json").read_text())["metrics"]
    assert np.isfinite(metrics["fid"])


def test_lora_on_the_blocks_adapts_every_linear_of_both_stacks():
    from tinyfusion.lora import lora_linear_names

    names = lora_linear_names(tiny_mar(), ["blocks"])
    assert len(names) == 4 * 4 and all(n.startswith(("encoder_blocks.", "decoder_blocks.")) for n in names)
    assert "decoder_blocks.1.mlp.fc2" in names


def test_per_stack_targets_and_the_oracle_prune_within_each_stack():
    from tinyfusion.pruning import oracle_indices, select_kept_per_stack, stack_targets

    depths = {"encoder": 16, "decoder": 16}
    assert stack_targets(["encoder=8", "decoder=8"], depths, "m.pt") == {"encoder": 8, "decoder": 8}
    assert stack_targets(["16"], depths, "m.pt") is None
    with pytest.raises(ValueError, match="give a depth for every stack; 'decoder'"):
        stack_targets(["encoder=8"], depths, "m.pt")
    with pytest.raises(ValueError, match="keep between 1 and 16 blocks of 'encoder'"):
        stack_targets(["encoder=0", "decoder=8"], depths, "m.pt")
    scores = [float(i % 4) for i in range(32)]  # the 3rd and 4th of every 4 blocks matter most
    kept = select_kept_per_stack(scores, {"encoder": 8, "decoder": 4}, depths)
    assert len([k for k in kept if k < 16]) == 8 and len([k for k in kept if k >= 16]) == 4
    assert all(scores[k] >= 2 for k in kept)
    # TinyMAR-D16's oracle: BK-SDM's pattern in each 16-block stack
    assert oracle_indices(16) == [0, 2, 4, 6, 9, 11, 13, 15]
