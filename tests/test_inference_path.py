"""The inference path (models/inference.py): weights held once in bf16 or fp16, fp32 where the numerics need it.

Bounds. A bf16 value keeps 8 significant bits (unit roundoff u = 2**-9 of its magnitude, 2**-8 between neighbours),
fp16 11 (u = 2**-12). Each block rounds its matmul inputs and outputs once, and the residual stream, the adaLN
modulation and the final layer stay float32, so the output's error is a few roundings of the blocks' branches,
which the adaLN gates scale down. Measured on the official code's tiny models (tests/data; relative to the output's
largest magnitude): bf16 2.4e-3 (DiT), 1.8e-3 (SiT), 5.4e-3 and 3.2e-3 (MAR's decoder and DiffLoss MLP), with the
MLPs' activations fused into oneDNN's bf16 linear on this CPU; fp16 3.0e-4, 1.8e-4, 8.6e-4, 2.9e-4. Autocast,
which also rounds the embeddings, adaLN and final layer, measured 7.0e-3, 4.9e-3, 7.8e-3 and 7.4e-3 in bf16.
The bound is 4 neighbour gaps of the precision (1.6e-2 bf16, 2.0e-3 fp16): at
least 1.6x the largest error measured, while a block left in float32 or an adaLN rounded to bf16 would not show, a
wrong cast (a weight in the wrong dtype, a dropped bias) fails by orders of magnitude.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from models.inference import ONEDNN_BF16, HeldLinear, hold_weights
from models.mar import MAR
from models.sit import SiT
from processes import create_process
from tinyfusion.checkpoint import load_model
from tinyfusion.precision import DTYPES, for_inference, inference_context
from tinyfusion.sampling import SamplingSpec, sample_latents

DATA = Path(__file__).resolve().parent / "data"
BOUND = {"bf16": 4 * 2.0 ** -8, "fp16": 4 * 2.0 ** -11}


def _rel(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.float() - expected).abs().max() / expected.abs().max()).item()


def _expected(name: str) -> dict:
    from safetensors.torch import load_file

    return load_file(str(DATA / name / "expected.safetensors"))


@pytest.fixture(scope="module")
def dit():
    return load_model(DATA / "dit_tiny" / "dit_tiny.pt", "DiT", num_heads=4).model


@pytest.fixture(scope="module")
def sit():
    config = json.loads((DATA / "sit_tiny" / "config.json").read_text())
    model = SiT(**config["model_config"])
    model.load_state_dict(torch.load(DATA / "sit_tiny" / "sit_tiny.pt", weights_only=True), strict=True)
    return model.eval()


@pytest.fixture(scope="module")
def mar():
    config = json.loads((DATA / "mar_tiny" / "config.json").read_text())
    model = MAR(**config["model_config"], norm_eps=config["norm_eps"])
    model.load_state_dict(torch.load(DATA / "mar_tiny" / "mar_tiny.pt", weights_only=True), strict=True)
    return model.eval()


def _inputs(family: str) -> tuple:
    e = _expected(f"{family}_tiny")
    return (e["x"] if family == "dit" else e["x1"]), e["t"], e["y"]


def test_which_weights_are_held(dit):
    held = hold_weights(copy.deepcopy(dit), torch.bfloat16)
    dtypes = {name: p.dtype for name, p in held.named_parameters()}
    low = {name for name, dtype in dtypes.items() if dtype == torch.bfloat16}
    # Exactly the blocks' attention and MLP linears (weight and bias), nothing else.
    assert low == {f"blocks.{i}.{layer}.{p}" for i in range(len(dit.blocks))
                   for layer in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2") for p in ("weight", "bias")}
    assert all(dtypes[n] == torch.float32 for n in dtypes if "adaLN" in n or "embedder" in n or "final_layer" in n)
    assert list(held.state_dict()) == list(dit.state_dict())  # same names, same values in the held dtype
    for name, value in dit.state_dict().items():
        torch.testing.assert_close(held.state_dict()[name].float(), value.to(dtypes.get(name, value.dtype)).float())


@pytest.mark.parametrize("family", ["dit", "sit"])
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_forward_agrees_with_fp32(family, precision, request):
    model = request.getfixturevalue(family)
    inputs = _inputs(family)
    with torch.no_grad():
        expected = model(*inputs)
        with torch.autocast("cpu", DTYPES[precision]):
            autocast_error = _rel(model(*inputs), expected)
        held = hold_weights(copy.deepcopy(model), DTYPES[precision])(*inputs)
    assert held.dtype == torch.float32  # the final layer is float32
    error = _rel(held, expected)
    assert error < BOUND[precision]
    # fp32 where it matters: more accurate than autocast, which rounds adaLN and the final layer too (measured
    # 2.6x-3.2x less error).
    assert error < autocast_error


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mar_agrees_with_fp32(mar, precision):
    e = _expected("mar_tiny")
    c = torch.randn(len(e["diffloss_t"]), mar.diffloss.net.cond_embed.in_features,
                    generator=torch.Generator().manual_seed(0))

    def run(model):
        encoded = model.forward_mae_encoder(model.patchify(e["imgs"]), e["mask"], model.class_emb(e["labels"]))
        return model.forward_mae_decoder(encoded, e["mask"]), model.diffloss.net(e["diffloss_x_t"], e["diffloss_t"], c)

    with torch.no_grad():
        expected = run(mar)
        held_model = hold_weights(copy.deepcopy(mar), DTYPES[precision])
        held = run(held_model)
    assert sum(isinstance(m, HeldLinear) for m in held_model.modules()) == 4 * 4 + 2 * 2  # 4 blocks, 2 res blocks
    for actual, wanted in zip(held, expected):
        assert _rel(actual, wanted) < BOUND[precision]


def test_activations_are_fused_into_the_held_linears(dit, mar):
    """The MLP's activation moves into its first linear (DiT: tanh GELU; MAR's timm blocks: exact GELU; DiffLoss:
    SiLU), leaving nn.Identity in its place. On a CPU with oneDNN's bf16 kernels the no-grad call is one oneDNN
    linear with the activation applied before the rounding to bf16; with autograd recording it is F.linear and the
    activation after the rounding. The two differ by the rounding of the linear's output before the activation: at
    most one bf16 neighbour gap of that output (2**-8 relative) and the accumulation order, so 2 gaps bound it."""
    held = hold_weights(copy.deepcopy(dit), torch.bfloat16)
    mlp = held.blocks[0].mlp
    assert mlp.fc1.post_op == ("gelu", "tanh") and isinstance(mlp.act, torch.nn.Identity) and mlp.fc2.post_op is None
    assert held.blocks[0].attn.qkv.post_op is None
    held_mar = hold_weights(copy.deepcopy(mar), torch.bfloat16)
    assert held_mar.encoder_blocks[0].mlp.fc1.post_op == ("gelu", "none")
    res_mlp = held_mar.diffloss.net.res_blocks[0].mlp
    assert res_mlp[0].post_op == ("swish", "") and isinstance(res_mlp[1], torch.nn.Identity)

    x = torch.randn(2, 16, mlp.fc1.in_features, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = dit.blocks[0].mlp.act(dit.blocks[0].mlp.fc1(x))  # float32
        fused = mlp.fc1(x)
    with torch.enable_grad():
        unfused = mlp.fc1(x.requires_grad_())
    assert fused.dtype == unfused.dtype == torch.bfloat16
    assert _rel(fused, unfused.detach().float()) < 2 * 2.0 ** -8
    if ONEDNN_BF16:  # two kernels ran: their roundings differ somewhere among the 2x16x64 outputs
        assert not torch.equal(fused, unfused.detach())
    # both are bf16 roundings of the float32 result
    assert _rel(fused, expected) < 2 * 2.0 ** -8 and _rel(unfused.detach(), expected) < 2 * 2.0 ** -8


def test_no_weight_is_cast_per_call(dit):
    """Autocast casts the weights of every linear on every call; the held path casts no weight, only the activations
    that cross between the float32 residual stream and a bf16 branch: into qkv and fc1, and back from proj and fc2
    (the gated residual add promotes them), four per block."""
    inputs = _inputs("dit")
    weight_shapes = {tuple(p.shape) for p in dit.parameters()}

    def casts(model, context) -> tuple[int, int]:
        with torch.no_grad(), context, torch.profiler.profile(record_shapes=True) as p:
            model(*inputs)
        events = [e for e in p.key_averages(group_by_input_shape=True) if e.key == "aten::_to_copy"]
        weights = sum(e.count for e in events if tuple(e.input_shapes[0]) in weight_shapes)
        activations = sum(e.count for e in events if e.input_shapes[0] and len(e.input_shapes[0]) == 3)
        return weights, activations

    held = for_inference(copy.deepcopy(dit), "bf16")
    assert casts(held, inference_context(held, "bf16", torch.device("cpu"))) == (0, 4 * len(dit.blocks))
    weights, _ = casts(dit, inference_context(dit, "bf16", torch.device("cpu")))
    assert weights >= 4 * len(dit.blocks)


@pytest.mark.parametrize("family", ["dit", "sit"])
def test_sampling_loop_agrees_with_fp32(family, request):
    """Ten steps of the family's default sampler (DiT: DDIM; SiT: Euler on the ODE) with guidance: the steps carry
    the forward's error along, so the bound is twice the forward's."""
    model = request.getfixturevalue(family)
    process = create_process(model.default_process(model.config))
    sampler = "ddim" if family == "dit" else "ode"
    options = None if family == "dit" else {"sampling_method": "euler"}
    labels, seeds = torch.tensor([0, 1, 2, 3]), [5, 6, 7, 8]
    out = {}
    for precision in ("fp32", "bf16"):
        spec = SamplingSpec.for_process(process, sampler=sampler, num_steps=10, options=options, cfg_scale=4.0,
                                        precision=precision)
        out[precision] = sample_latents(for_inference(copy.deepcopy(model), precision), process, labels, seeds, spec)
    assert _rel(out["bf16"], out["fp32"]) < 2 * BOUND["bf16"]


def test_mar_sampling_runs_on_the_path(mar):
    """MAR's own loop (masked iterations, DiffLoss per token) on held weights: close to fp32 after every iteration."""
    process = create_process(mar.default_process(mar.config))
    labels, seeds = torch.tensor([0, 1]), [3, 4]
    out = {}
    for precision in ("fp32", "bf16"):
        spec = SamplingSpec.for_process(process, sampler=None, num_steps=None, cfg_scale=1.0, precision=precision,
                                        data_shape=mar.data_shape)
        out[precision] = sample_latents(for_inference(copy.deepcopy(mar), precision), process, labels, seeds, spec)
    assert out["bf16"].dtype == torch.float32
    assert 0 < _rel(out["bf16"], out["fp32"]) < 4 * BOUND["bf16"]


def test_held_model_sampled_in_another_precision_is_a_bug(dit):
    held = hold_weights(copy.deepcopy(dit), torch.bfloat16)
    with pytest.raises(ValueError, match="held in torch.bfloat16, but it is sampled in fp16"):
        inference_context(held, "fp16", torch.device("cpu"))
    with pytest.raises(ValueError, match="held in torch.bfloat16 already"):
        hold_weights(held, torch.float16)
    assert hold_weights(held, torch.bfloat16) is held  # once is enough
    fp32 = copy.deepcopy(dit)
    assert for_inference(fp32, "fp32") is fp32 and not any(isinstance(m, HeldLinear) for m in fp32.modules())
    assert all(p.dtype == torch.float32 for p in fp32.parameters())


def test_sample_script_takes_the_path(tmp_path):
    """sample.py --precision bf16 samples on the inference path (its log says so) and draws the fp32 grid within
    the loop's bound: the pixels of the two PNGs differ by at most a few levels of 255."""
    import numpy as np
    from helpers import run_cli, tiny_dit
    from PIL import Image

    from tinyfusion.checkpoint import save_model

    save_model(tmp_path / "m.pt", tiny_dit(in_channels=3), codec={"vae": "none", "scaling_factor": 1.0})
    grids = {}
    for precision in ("fp32", "bf16"):
        out = tmp_path / f"{precision}.png"
        proc = run_cli(["sample.py", "--ckpt", str(tmp_path / "m.pt"), "--vae", "none", "--sampler", "ddim",
                        "--num-sampling-steps", "10", "--class-labels", "0", "1", "--precision", precision,
                        "--device", "cpu", "--out", str(out)])
        grids[precision] = np.asarray(Image.open(out), dtype=np.int16)
        assert f"cfg 4, {precision}" in proc.stdout + proc.stderr
    difference = np.abs(grids["bf16"] - grids["fp32"])
    assert 0 < difference.max() <= 255 * 2 * BOUND["bf16"] / 2  # images span [-1, 1]: 255 / 2 levels per unit


def test_diffusers_dit_takes_the_path_on_the_same_layers(dit):
    """benchmarks.forward --compare-diffusers times diffusers' DiT on the inference path too: each block's attention
    and feed-forward linears held (six per block in diffusers' layout), agreeing with its float32 self (not with
    ours: diffusers spaces the timestep frequencies otherwise, see the README's diffusers section)."""
    from tinyfusion.diffusers_io import DiffusersDiT, to_diffusers

    inputs = _inputs("dit")
    theirs = DiffusersDiT(to_diffusers(dit)).eval()
    with torch.no_grad():
        expected = theirs(*inputs)
        held = for_inference(copy.deepcopy(theirs), "bf16")
        out = held(*inputs)
    assert sum(isinstance(m, HeldLinear) for m in held.modules()) == 6 * len(dit.blocks)
    assert _rel(out, expected) < BOUND["bf16"]


def test_compiled_held_model_traces_the_plain_linear(dit):
    """Under torch.compile the held linears trace as F.linear and the activation: inductor lowers oneDNN's fused op
    only for frozen weights ("weight must be a graph constant"), and fuses the activation itself. The captured graph
    holds no oneDNN op and computes what the eager held model does, up to the rounding of the linear's output before
    the activation (2 bf16 gaps, as above)."""
    held = hold_weights(copy.deepcopy(dit), torch.bfloat16)
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(str(gm.graph))
        return gm.forward

    inputs = _inputs("dit")
    with torch.no_grad():
        eager = held(*inputs)
        compiled = torch.compile(held, backend=capture, fullgraph=True)(*inputs)
    assert len(graphs) == 1 and "_linear_pointwise" not in graphs[0] and "gelu" in graphs[0]
    assert _rel(compiled, eager) < 2 * 2.0 ** -8
