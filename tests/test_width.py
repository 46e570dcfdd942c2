"""Width pruning: the surgery (heads and MLP channels cut out exactly), the criteria, and the CLI."""

import pytest
import torch
from helpers import fit_tiny, tiny_dit, tiny_mar, tiny_sit
from helpers.tolerance import assert_fp32_close

from models import DiT, flat_blocks, prune_depth, prune_width
from tinyfusion.checkpoint import load_model, save_model
from tinyfusion.errors import UserError

#################################################################################
#                                    Surgery                                    #
#################################################################################


class ZeroedUnits:
    """Forward pre-hooks that zero the removed heads' attention outputs (the output projection's inputs of
    those heads) and the removed channels' activations (fc2's inputs): the reference that surgery must equal."""

    def __init__(self, model, kept_heads, kept_channels):
        self.handles = []
        for block, heads, channels in zip(flat_blocks(model), kept_heads, kept_channels):
            d = block.attn.head_dim
            head_mask = torch.zeros(block.attn.num_heads, d)
            head_mask[list(heads)] = 1.0
            channel_mask = torch.zeros(block.mlp.fc1.out_features)
            channel_mask[list(channels)] = 1.0
            self.handles.append(block.attn.proj.register_forward_pre_hook(_times(head_mask.reshape(-1))))
            self.handles.append(block.mlp.fc2.register_forward_pre_hook(_times(channel_mask)))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()


def _times(mask):
    return lambda module, args: (args[0] * mask,)


def _inputs(model, n=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *model.data_shape, generator=g)
    t = torch.rand(n, generator=g) if model.arch == "SiT" else torch.randint(0, 1000, (n,), generator=g)
    return x, t, torch.randint(0, 10, (n,), generator=g)


def _check_exact(model, kept_heads, kept_channels):
    x, t, y = _inputs(model)
    pruned = prune_width(model, kept_heads, kept_channels)
    with torch.no_grad():
        with ZeroedUnits(model, kept_heads, kept_channels):
            expected = model(x, t, y)
        full = model(x, t, y)
        actual = pruned(x, t, y)
    assert_fp32_close(actual, expected)
    assert not torch.allclose(full, expected, atol=1e-3)  # the removed units mattered: the test can fail
    return pruned


@pytest.mark.parametrize("make", [tiny_dit, tiny_sit], ids=["DiT", "SiT"])
def test_uniform_width_surgery_equals_the_zeroed_model(make):
    model = make(num_heads=4).eval()  # 4 heads of 8, 128 MLP channels, 4 blocks
    kept_heads = [[0, 2], [1, 3], [0, 1], [2, 3]]
    kept_channels = [list(range(b, 128, 2)) for b in (0, 1, 0, 1)]
    pruned = _check_exact(model, kept_heads, kept_channels)
    assert type(pruned) is type(model)
    assert pruned.config["block_widths"] == [{"num_heads": 2, "head_dim": 8, "mlp_hidden": 64}] * 4
    assert model.config["block_widths"][0] == {"num_heads": 4, "head_dim": 8, "mlp_hidden": 128}  # untouched
    # what surgery does not cut is copied bit for bit; the residual width and adaLN keep their sizes
    for name, tensor in model.state_dict().items():
        if not any(part in name for part in ("attn.qkv", "attn.proj.weight", "mlp.fc1", "mlp.fc2.weight")):
            assert torch.equal(pruned.state_dict()[name], tensor), name
    block, source = pruned.blocks[1], model.blocks[1]
    assert torch.equal(block.attn.qkv.weight[8:16], source.attn.qkv.weight[24:32])  # q of head 3
    assert torch.equal(block.attn.qkv.weight[16 + 8:16 + 16], source.attn.qkv.weight[32 + 24:32 + 32])  # k of head 3
    assert torch.equal(block.attn.proj.weight[:, :8], source.attn.proj.weight[:, 8:16])  # head 1's columns
    assert torch.equal(block.mlp.fc2.weight[:, 1], source.mlp.fc2.weight[:, 3])


@pytest.mark.parametrize("make", [tiny_dit, tiny_sit], ids=["DiT", "SiT"])
def test_per_block_width_surgery_equals_the_zeroed_model_and_composes(make):
    model = make(num_heads=4).eval()
    kept_heads = [[3], [0, 1, 2], [0, 1, 2, 3], [1, 2]]
    kept_channels = [[5], list(range(0, 128, 3)), list(range(100)), [0, 64, 127]]
    pruned = _check_exact(model, kept_heads, kept_channels)
    assert [w["num_heads"] for w in pruned.config["block_widths"]] == [1, 3, 4, 2]
    assert [w["mlp_hidden"] for w in pruned.config["block_widths"]] == [1, 43, 100, 3]
    # a model of per-block widths is cut again, exactly
    again = _check_exact(pruned, [[0], [0, 2], [1, 3], [1]], [[0], list(range(20)), list(range(0, 100, 7)), [2]])
    assert [w["num_heads"] for w in again.config["block_widths"]] == [1, 2, 2, 1]


def test_a_width_pruned_file_rebuilds_itself_and_is_depth_pruned_later(tmp_path):
    model = tiny_dit(num_heads=4).eval()
    pruned = prune_width(model, [[3], [0, 1], [0, 1, 2], [1, 2]], [[5, 6], list(range(10)), list(range(99)), [4]])
    save_model(tmp_path / "w.pt", pruned)
    loaded = load_model(tmp_path / "w.pt")
    assert loaded.config == pruned.config
    x, t, y = _inputs(model)
    with torch.no_grad():
        assert torch.equal(loaded.model(x, t, y), pruned(x, t, y))
        shallow = prune_depth(loaded.model, [1, 3])
        assert shallow.config["block_widths"] == [pruned.config["block_widths"][i] for i in (1, 3)]
        assert torch.equal(shallow.blocks[0].attn.qkv.weight, pruned.blocks[1].attn.qkv.weight)
        shallow(x, t, y)


def test_width_surgery_refuses_what_it_cannot_cut():
    model = tiny_dit()
    with pytest.raises(ValueError, match="keeps no heads"):
        prune_width(model, [[], [0], [0], [0]], [[0]] * 4)
    with pytest.raises(ValueError, match="distinct indices"):
        prune_width(model, [[0, 0], [0], [0], [0]], [[0]] * 4)
    with pytest.raises(ValueError, match="each of the 4 blocks"):
        prune_width(model, [[0]] * 3, [[0]] * 3)
    with pytest.raises(UserError, match="records none"):
        prune_width(tiny_mar(), [[0]] * 4, [[0]] * 4)


def test_a_bare_state_dict_of_per_block_widths_is_refused(tmp_path):
    pruned = prune_width(tiny_dit(num_heads=4), [[0], [0, 1], [0, 1], [0]], [[0], [1], [2], [3]])
    torch.save(pruned.state_dict(), tmp_path / "bare.pt")
    with pytest.raises(UserError, match="cannot describe its heads") as info:
        load_model(tmp_path / "bare.pt", "DiT", num_heads=4)
    assert "\n" not in str(info.value)
    assert isinstance(pruned, DiT)


#################################################################################
#                                    Criteria                                   #
#################################################################################

def _batch(model, n=4, seed=2):
    x, _, y = _inputs(model, n, seed)
    g = torch.Generator().manual_seed(seed + 1)
    noise = torch.randn(x.shape, generator=g)
    return {"x": x, "y": y, "draws": {"t": torch.zeros(n, dtype=torch.long), "noise": noise}}


def _direct_head_and_channel_sums(model):
    """sum |w * g| written out unit by unit from the layers' weights and gradients (float64)."""
    heads, channels = [], []
    for block in model.blocks:
        H, d = block.attn.num_heads, block.attn.head_dim
        qkv = (block.attn.qkv.weight * block.attn.qkv.weight.grad).abs().double()
        proj = (block.attn.proj.weight * block.attn.proj.weight.grad).abs().double()
        heads.append(torch.stack([
            sum(qkv[part * H * d + h * d: part * H * d + (h + 1) * d].sum() for part in range(3))
            + proj[:, h * d:(h + 1) * d].sum() for h in range(H)]))
        fc1 = (block.mlp.fc1.weight * block.mlp.fc1.weight.grad).abs().double()
        fc2 = (block.mlp.fc2.weight * block.mlp.fc2.weight.grad).abs().double()
        channels.append(torch.stack([fc1[c].sum() + fc2[:, c].sum() for c in range(fc1.shape[0])]))
    return heads, channels


def test_taylor_scores_are_the_sum_of_weight_times_gradient_over_the_given_timesteps():
    from diffusion import create_diffusion
    from processes import create_process
    from tinyfusion.pruning import accumulate_taylor_gradients, taylor_scores

    model = tiny_dit(num_heads=4).eval()  # learn_sigma: 8 output channels, the first 4 the noise
    batches = [_batch(model, seed=2), _batch(model, seed=5)]
    times = [0, 3, 250, 999]
    walk = accumulate_taylor_gradients(model, create_process({"name": "gaussian"}), batches, global_batch_size=4,
                                       threshold=0.0, times=times)
    scores = taylor_scores(model)
    assert walk.times == times and len(walk.losses) == 4
    assert all(p.requires_grad for p in model.parameters())  # restored

    # Directly: Diff-Pruning's mse_loss(eps_pred, noise) of each batch at each timestep, backpropagated.
    reference = tiny_dit(num_heads=4).eval()
    diffusion = create_diffusion("")
    losses = []
    for t in times:
        total = 0.0
        for b in batches:
            tt = torch.full((4,), t, dtype=torch.long)
            out = reference(diffusion.q_sample(b["x"], tt, noise=b["draws"]["noise"]), tt, b["y"])
            loss = torch.nn.functional.mse_loss(out[:, :4], b["draws"]["noise"])
            loss.backward()
            total += loss.item()
        losses.append(total)
    assert walk.losses == pytest.approx(losses, rel=1e-5)
    heads, channels = _direct_head_and_channel_sums(reference)
    for mine, direct in zip(scores.heads + scores.channels, heads + channels):
        assert_fp32_close(mine, direct / direct.mean())  # Torch-Pruning's "mean" normalizer, per block
    assert scores.heads[0].shape == (4,) and scores.channels[0].shape == (128,)


def test_the_early_stop_takes_exactly_the_timesteps_of_the_rule():
    from processes.gaussian import GaussianProcess
    from tinyfusion.pruning import accumulate_taylor_gradients, walk_timesteps

    # the rule alone: the largest loss so far is tracked, and the loop ends after the first loss below thr * max
    curve = [2.0, 5.0, 3.0, 1.0, 0.3, 0.26, 0.2, 9.0, 0.01]
    walk = walk_timesteps(range(len(curve)), lambda t: curve[t], 0.05)
    assert walk.times == [0, 1, 2, 3, 4, 5, 6] and walk.losses == curve[:7]  # 0.2 < 0.05 * 5, included
    assert walk_timesteps(range(4), lambda t: [1.0, 0.04, 5.0, 0.0][t], 0.05).times == [0, 1]  # max so far
    assert walk_timesteps(range(4), lambda t: [1.0, 0.04, 5.0, 0.0][t], 0.0).times == [0, 1, 2, 3]

    class Planted(GaussianProcess):
        """The loss of timestep t is planted[t] exactly; its gradient is planted[t] / mse of the true mse's."""

        def calibration_loss(self, prediction, x, draws):
            mse = super().calibration_loss(prediction, x, draws)
            return planted[int(draws["t"][0])] * mse / mse.detach()

    planted = {t: 1.0 / (1 + t) ** 2 for t in range(1000)}  # 1, 1/4, 1/9, ...: below 0.05 first at t = 4
    model = tiny_dit(num_heads=4).eval()
    walk = accumulate_taylor_gradients(model, Planted(), [_batch(model)], global_batch_size=4)
    assert walk.times == [0, 1, 2, 3, 4] and walk.losses == pytest.approx([planted[t] for t in range(5)])
    grads = [p.grad.clone() for p in (model.blocks[0].attn.qkv.weight, model.blocks[3].mlp.fc2.weight)]
    # the gradient is that of exactly those five timesteps, the last one included
    again = tiny_dit(num_heads=4).eval()
    accumulate_taylor_gradients(again, Planted(), [_batch(again)], global_batch_size=4, threshold=0.0,
                                times=range(5))
    for grad, p in zip(grads, (again.blocks[0].attn.qkv.weight, again.blocks[3].mlp.fc2.weight)):
        assert torch.equal(grad, p.grad)


DEAD_HEADS = {0: [0, 1], 2: [3], 3: [2]}  # 4 of 16 heads
DEAD_CHANNELS = {0: range(0, 384, 2), 1: range(64), 2: range(100, 228), 3: range(384, 512)}  # 512 of 2048


def _planted_width_model():
    """A DiT of 4 blocks of 4 heads of 32 and 512 MLP channels, whose useless heads write nothing (their
    output-projection columns are zero) and whose dead channels never activate (fc1 row and bias zero: GELU(0) = 0)."""
    model = tiny_dit(hidden_size=128, num_heads=4).eval()
    with torch.no_grad():
        for b, heads in DEAD_HEADS.items():
            for h in heads:
                model.blocks[b].attn.proj.weight[:, h * 32:(h + 1) * 32] = 0.0
        for b, channels in DEAD_CHANNELS.items():
            model.blocks[b].mlp.fc1.weight[list(channels)] = 0.0
            model.blocks[b].mlp.fc1.bias[list(channels)] = 0.0
    return model


@pytest.mark.parametrize("criterion", ["taylor", "magnitude"])
def test_every_criterion_but_random_removes_the_planted_useless_heads_and_dead_channels_first(criterion):
    from processes import create_process
    from tinyfusion.pruning import (
        accumulate_taylor_gradients,
        magnitude_scores,
        random_unit_scores,
        select_units,
        taylor_scores,
    )

    model = _planted_width_model()
    if criterion == "taylor":
        accumulate_taylor_gradients(model, create_process({"name": "gaussian"}), [_batch(model)],
                                    global_batch_size=4, threshold=0.0, times=[0, 10, 100, 500])
        scores = taylor_scores(model)
        for b, heads in DEAD_HEADS.items():  # nothing flows through a useless head or a dead channel
            assert scores.heads[b][heads].abs().max() == 0 and scores.heads[b].max() > 0
    else:
        scores = magnitude_scores(model)
    dead_heads = [sorted(DEAD_HEADS.get(b, [])) for b in range(4)]
    dead_channels = [sorted(DEAD_CHANNELS[b]) for b in range(4)]

    def removed(kept, total):
        return [[u for u in range(total) if u not in set(k)] for k in kept]

    # ranked across blocks, the 25% removed are exactly the planted ones
    assert removed(select_units(scores.heads, 0.25, global_rank=True), 4) == dead_heads
    assert removed(select_units(scores.channels, 0.25, global_rank=True), 512) == dead_channels
    # in every block alike (each block has at least 64 dead channels), the 64 removed of each are dead ones
    for b, gone in enumerate(removed(select_units(scores.channels, 0.125), 512)):
        assert len(gone) == 64 and set(gone) <= set(dead_channels[b])
    for b, gone in enumerate(removed(select_units(scores.heads, 0.25), 4)):
        assert len(gone) == 1 and (set(gone) <= set(dead_heads[b]) or not dead_heads[b])
    random = random_unit_scores(model, seed=0)
    assert removed(select_units(random.channels, 0.25, global_rank=True), 512) != dead_channels


def test_unit_selection_keeps_a_head_per_block_and_rounds_the_ratio():
    from tinyfusion.pruning import select_units

    scores = [torch.tensor([0.1, 0.2, 0.3]), torch.tensor([5.0, 6.0, 7.0]), torch.tensor([0.0, 0.0, 0.05])]
    assert select_units(scores, 0.4) == [[1, 2], [1, 2], [1, 2]]  # 1.2: 1 of 3, ties to the lower index
    assert select_units(scores, 0.5) == [[2], [2], [2]]  # 1.5 rounds up: 2 of 3
    assert select_units(scores, 0.5, global_rank=True) == [[2], [1, 2], [2]]  # 5 of 9, never a block's last
    assert select_units(scores, 0.99) == [[2], [2], [2]]  # never a block's last unit


def test_sit_walks_the_transport_grid_from_the_data_end():
    from processes import create_process
    from tinyfusion.pruning import accumulate_taylor_gradients

    process = create_process({"name": "transport"})  # Linear, velocity: t = 1 is data
    grid = process.calibration_times()
    assert grid[0] == 1.0 and grid[-1] == 0.0 and len(grid) == 1000 and bool((grid.diff() < 0).all())
    model = tiny_sit(num_heads=4).eval()
    batch = _batch(model)
    batch["draws"]["t"] = torch.zeros(4)
    walk = accumulate_taylor_gradients(model, process, [batch], global_batch_size=4, threshold=0.0, times=grid[:3])
    assert walk.times == pytest.approx([1.0, 1 - 1 / 999, 1 - 2 / 999])
    assert all(block.attn.qkv.weight.grad.abs().sum() > 0 for block in model.blocks)


#################################################################################
#                                 Through the CLI                               #
#################################################################################

@pytest.fixture(scope="module")
def official(tmp_path_factory):
    """A tiny pixel DiT of 4 blocks of 4 heads (8x8 RGB, 10 classes) trained a little on class patterns, saved as an
    official-layout state dict, and its features."""
    from helpers import write_features

    from tinyfusion.synthetic import class_pattern_latents

    root = tmp_path_factory.mktemp("width")
    latents, labels = class_pattern_latents(128, (3, 8, 8))
    write_features(root / "features", latents, labels, 10)
    model = tiny_dit(in_channels=3, num_heads=4, randomize=False)
    fit_tiny(model, latents, labels, 60)
    torch.save(model.state_dict(), root / "official.pt")
    return {"root": root, "ckpt": root / "official.pt", "data": root / "features", "model": model.eval()}


def _width_prune(official, out, *extra):
    import json

    from helpers import run_cli

    run_cli(["prune_by_score.py", "--model", "DiT", "--num-heads", "4", "--ckpt", str(official["ckpt"]),
             "--data-path", str(official["data"]), "--batch-size", "16", "--width-ratio", "0.5",
             "--taylor-threshold", "0.5", "--save-model", str(out), *extra])
    return load_model(out), json.loads(out.with_suffix(".scores.json").read_text())


def _check_later_stages_load(official, pruned_path, tmp_path):
    """sample.py, train_masked_kd.py (from the unpruned teacher) and prune_by_index.py take the file with no model
    flags; depth pruning keeps the kept blocks' widths and lineage."""
    from helpers import run_cli
    from PIL import Image

    run_cli(["sample.py", "--ckpt", str(pruned_path), "--num-sampling-steps", "3", "--vae", "none", "--device", "cpu",
             "--class-labels", "1", "2", "--out", str(tmp_path / "grid.png")])
    assert Image.open(tmp_path / "grid.png").size[0] > 0
    run_cli(["train_masked_kd.py", "--load-weight", str(pruned_path), "--load-teacher", str(official["ckpt"]),
             "--teacher", "DiT", "--teacher-num-heads", "4", "--data-path", str(official["data"]),
             "--results-dir", str(tmp_path), "--prefix", "kd", "--global-batch-size", "8", "--num-workers", "0",
             "--max-steps", "2", "--log-every", "1", "--device", "cpu", "--save-model", str(tmp_path / "kd.pt")])
    import json

    records = [json.loads(line) for line in (tmp_path / "kd" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["feat"] > 0 for r in records)  # the feature loss maps the blocks one to one
    assert load_model(tmp_path / "kd.pt").config == load_model(pruned_path).config
    run_cli(["prune_by_index.py", "--ckpt", str(pruned_path), "--kept-indices", "0", "2", "--save-model",
             str(tmp_path / "shallow.pt")])
    pruned, shallow = load_model(pruned_path), load_model(tmp_path / "shallow.pt")
    assert shallow.config["block_widths"] == [pruned.config["block_widths"][i] for i in (0, 2)]
    assert shallow.lineage["kept_indices"] == [0, 2] and shallow.lineage["method"] == "index"
    for key in ("kept_heads", "kept_channels"):
        assert shallow.lineage[key] == [pruned.lineage[key][i] for i in (0, 2)]
    assert shallow.lineage["width"] == pruned.lineage["width"]


def _block_share(loaded, official):
    from tinyfusion.pruning.width import block_parameter_count

    return block_parameter_count(flat_blocks(loaded.model)) / block_parameter_count(flat_blocks(official["model"]))


def test_width_pruning_by_taylor_through_the_cli(official, tmp_path):
    pruned, scores = _width_prune(official, tmp_path / "w.pt")
    assert pruned.config["depth"] == 4 and 0.4 <= _block_share(pruned, official) <= 0.6
    assert pruned.config["block_widths"] == [{"num_heads": 2, "head_dim": 8, "mlp_hidden": 64}] * 4
    lineage = pruned.lineage
    assert lineage["method"] == "width-taylor" and lineage["kept_indices"] == [0, 1, 2, 3]
    assert lineage["width"] == {"criterion": "taylor", "ratio": 0.5, "global": False}
    assert [len(h) for h in lineage["kept_heads"]] == [2] * 4 and [len(c) for c in lineage["kept_channels"]] == [64] * 4
    # the file equals the source with the other heads and channels cut out
    expected = prune_width(official["model"], lineage["kept_heads"], lineage["kept_channels"])
    for name, tensor in expected.state_dict().items():
        assert torch.equal(pruned.model.state_dict()[name], tensor), name
    # the timesteps walked from the data end, and the rule stopped the walk where it says
    width = scores["width"]
    steps, losses = width["timesteps"], width["losses"]
    assert steps == list(range(len(steps))) and 1 < len(steps) < 1000
    assert all(losses[i] >= 0.5 * max(losses[:i + 1]) for i in range(len(steps) - 1))
    assert losses[-1] < 0.5 * max(losses)
    assert pruned.extra["width"]["timesteps"] == steps
    _check_later_stages_load(official, tmp_path / "w.pt", tmp_path)


def test_global_width_pruning_gives_blocks_different_widths_that_later_stages_load(official, tmp_path):
    pruned, scores = _width_prune(official, tmp_path / "g.pt", "--global-width", "--width-criterion", "magnitude")
    widths = pruned.config["block_widths"]
    assert len({(w["num_heads"], w["mlp_hidden"]) for w in widths}) > 1
    assert sum(w["num_heads"] for w in widths) == 8 and sum(w["mlp_hidden"] for w in widths) == 256
    assert 0.4 <= _block_share(pruned, official) <= 0.6
    assert pruned.lineage["width"] == {"criterion": "magnitude", "ratio": 0.5, "global": True}
    assert "timesteps" not in scores["width"]
    _check_later_stages_load(official, tmp_path / "g.pt", tmp_path)
    # the other stages too: fine-tuning, learned depth pruning and an FID sample set
    from helpers import run_cli

    common = ["--data-path", str(official["data"]), "--results-dir", str(tmp_path), "--global-batch-size", "8",
              "--num-workers", "0", "--max-steps", "1", "--device", "cpu"]
    run_cli(["train.py", "--load-weight", str(tmp_path / "g.pt"), "--prefix", "ft", *common, "--save-model",
             str(tmp_path / "ft.pt")])
    assert load_model(tmp_path / "ft.pt").config == pruned.config
    run_cli(["prune_by_learning.py", "--load-weight", str(tmp_path / "g.pt"), "--groups", "2x1:2", "--prefix", "pl",
             *common, "--save-model", str(tmp_path / "pl.pt")])
    learned = load_model(tmp_path / "pl.pt")
    kept = learned.lineage["kept_indices"]
    assert learned.config["block_widths"] == [widths[i] for i in kept]
    assert learned.lineage["kept_heads"] == [pruned.lineage["kept_heads"][i] for i in kept]
    run_cli(["sample_ddp.py", "--ckpt", str(tmp_path / "g.pt"), "--num-sampling-steps", "3", "--vae", "none",
             "--device", "cpu", "--num-fid-samples", "2", "--per-proc-batch-size", "2", "--sample-dir",
             str(tmp_path / "samples"), "--npz", str(tmp_path / "g.npz")])
    assert (tmp_path / "g.npz").is_file()


def test_depth_then_width_in_one_call(official, tmp_path):
    pruned, scores = _width_prune(official, tmp_path / "dw.pt", "--criterion", "random", "--n-pruned", "1",
                                  "--width-criterion", "random")
    kept = scores["kept_indices"]
    assert len(kept) == 3 and pruned.lineage["kept_indices"] == kept
    assert pruned.lineage["method"] == "score-random+width-random"
    expected = prune_width(prune_depth(official["model"], kept), pruned.lineage["kept_heads"],
                           pruned.lineage["kept_channels"])
    for name, tensor in expected.state_dict().items():
        assert torch.equal(pruned.model.state_dict()[name], tensor), name


@pytest.mark.parametrize("args, message", [
    (["--width-ratio", "1.0"], "--width-ratio 1: give the fraction"),
    (["--width-ratio", "0.5", "--taylor-threshold", "1.5"], "--taylor-threshold 1.5"),
    (["--global-width", "--n-pruned", "1"], "--global-width applies to width pruning"),
    ([], "give what to prune"),
    (["--width-ratio", "0.5", "--width-criterion", "taylor"], "--width-criterion taylor needs calibration data"),
])
def test_width_flags_are_checked(tmp_path, args, message):
    from helpers import run_cli

    save_model(tmp_path / "m.pt", tiny_dit())
    proc = run_cli(["prune_by_score.py", "--ckpt", str(tmp_path / "m.pt"), *args, "--save-model",
                    str(tmp_path / "p.pt")], check=False)
    assert proc.returncode == 2 and message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_width_pruning_a_mar_is_a_one_line_error(tmp_path):
    from helpers import run_cli

    save_model(tmp_path / "mar.pt", tiny_mar())
    proc = run_cli(["prune_by_score.py", "--ckpt", str(tmp_path / "mar.pt"), "--width-ratio", "0.5",
                    "--width-criterion", "magnitude", "--save-model", str(tmp_path / "p.pt")], check=False)
    assert proc.returncode == 2 and "records none" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_taylor_width_pruning_is_the_same_on_one_and_two_processes(official, tmp_path):
    import json

    from helpers import run_cli

    records = []
    for nproc in (1, 2):
        out = tmp_path / f"w{nproc}.pt"
        run_cli(["prune_by_score.py", "--model", "DiT", "--num-heads", "4", "--ckpt", str(official["ckpt"]),
                 "--data-path", str(official["data"]), "--batch-size", "16", "--width-ratio", "0.5", "--global-width",
                 "--taylor-threshold", "0.5", "--device", "cpu", "--save-model", str(out)], nproc=nproc)
        records.append(json.loads(out.with_suffix(".scores.json").read_text())["width"])
    one, two = records
    assert one["timesteps"] == two["timesteps"] and one["losses"] == pytest.approx(two["losses"], rel=1e-5)
    for key in ("head_scores", "channel_scores"):
        for a, b in zip(one[key], two[key]):
            assert a == pytest.approx(b, rel=1e-4, abs=1e-6)
    assert one["kept_heads"] == two["kept_heads"]


def test_the_forward_benchmark_times_width_pruned_registry_models():
    from benchmarks.harness import bench_model, forward_call

    bm = bench_model("DiT-Nano/2@width=0.5", 4, torch.device("cpu"))
    assert bm.config["block_widths"] == [{"num_heads": 2, "head_dim": 16, "mlp_hidden": 128}] * 8
    with torch.no_grad():
        forward_call(bm, 1, torch.device("cpu"))()
    with pytest.raises(UserError, match="between 0 and 1"):
        bench_model("DiT-Nano/2@width=1.5", 4, torch.device("cpu"))
