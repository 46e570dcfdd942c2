"""The seam: a model-contract test for every registered family, and a toy second family (two block
stacks, its own noise process) taken through the library with no change to any script or module."""

from __future__ import annotations

import abc
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from helpers import tiny_dit, write_features
from helpers.tolerance import LOOP_REL, assert_fp32_close

from models import (
    ARCHITECTURES,
    MODELS,
    GatedModel,
    flat_blocks,
    parse_stack_groups,
    parse_stack_indices,
    prune_depth,
    register_family,
    stack_depths,
    unwrap,
)
from processes import NoiseProcess, TimeDomain, create_process, register_process
from processes.base import _PROCESSES
from tinyfusion.checkpoint import load_model, save_model
from tinyfusion.distributed import init_distributed
from tinyfusion.engine import TrainConfig, Trainer
from tinyfusion.errors import UserError
from tinyfusion.features import FeatureDataset
from tinyfusion.lora import add_lora, has_lora, strip_lora
from tinyfusion.pruning import block_influence, loss_sensitivity, save_pruned
from tinyfusion.sampling import SamplingSpec, sample_latents
from tinyfusion.training import DiffusionTask

#################################################################################
#                               A toy second family                             #
#################################################################################


class ToyBlock(nn.Module):
    """A residual MLP over tokens, conditioned additively: x + mlp(x + c)."""

    def __init__(self, width: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(x + c.unsqueeze(1))


class TwoTower(nn.Module):
    """An encoder stack and a decoder stack over pixel tokens (the shape of MAR, in miniature)."""

    arch = "TwoTower"
    stacks = {"encoder": ("encoder_blocks", "encoder_depth", None),
              "decoder": ("decoder_blocks", "decoder_depth", None)}

    def __init__(self, input_size: int = 4, in_channels: int = 1, width: int = 16, encoder_depth: int = 3,
                 decoder_depth: int = 2, num_classes: int = 3, class_dropout_prob: float = 0.1):
        super().__init__()
        self.config = dict(input_size=input_size, in_channels=in_channels, width=width, encoder_depth=encoder_depth,
                           decoder_depth=decoder_depth, num_classes=num_classes,
                           class_dropout_prob=class_dropout_prob)
        self.num_classes = num_classes
        self.embed = nn.Linear(in_channels, width)
        self.time = nn.Linear(1, width)
        self.label = nn.Embedding(num_classes + 1, width)
        self.encoder_blocks = nn.ModuleList(ToyBlock(width) for _ in range(encoder_depth))
        self.decoder_blocks = nn.ModuleList(ToyBlock(width) for _ in range(decoder_depth))
        self.out = nn.Linear(width, in_channels)

    @property
    def label_dropout(self) -> float:
        return self.config["class_dropout_prob"]

    @property
    def data_shape(self) -> tuple[int, int, int]:
        return (self.config["in_channels"], self.config["input_size"], self.config["input_size"])

    @classmethod
    def default_process(cls, config: dict) -> dict:
        return {"name": "toy-flow"}

    @classmethod
    def config_from_state_dict(cls, state_dict: dict, num_heads=None) -> dict:
        raise UserError("a TwoTower is read from self-describing files only")

    def forward(self, x, t, y, force_drop_ids=None):
        n, ch, h, w = x.shape
        if force_drop_ids is not None:
            y = torch.where(force_drop_ids == 1, torch.full_like(y, self.num_classes), y)
        c = self.time(t.float().view(-1, 1)) + self.label(y)  # (N, D)
        tokens = self.embed(x.flatten(2).transpose(1, 2))  # (N, H * W, D)
        for block in [*self.encoder_blocks, *self.decoder_blocks]:
            tokens = block(tokens, c)
        return self.out(tokens).transpose(1, 2).reshape(n, ch, h, w)


class ToyFlow(NoiseProcess):
    """Linear interpolation x_t = (1 - t) noise + t x with velocity x - noise; an Euler sampler."""

    name = "toy-flow"
    samplers = ("euler",)
    default_steps = {"euler": 8}

    def record(self) -> dict:
        return {"name": self.name}

    def time_domain(self) -> TimeDomain:
        return TimeDomain("continuous", start=0.0, end=1.0)

    def draw(self, generator, batch_size, shape, device):
        t = torch.rand(batch_size, generator=generator, device=device)
        return {"t": t, "noise": torch.randn((batch_size, *shape), generator=generator, device=device)}

    def model_input(self, x, draws):
        t = draws["t"].view(-1, 1, 1, 1)
        return (1 - t) * draws["noise"] + t * x, draws["t"]

    def losses(self, prediction, x, draws):
        mse = ((prediction.output - (x - draws["noise"])) ** 2).flatten(1).mean(1)
        return {"loss": mse, "mse": mse}

    def distillation_loss(self, student, teacher):
        return ((student.output - teacher.output.detach()) ** 2).flatten(1).mean(1)

    def sample(self, denoise, noise, cond, *, sampler, num_steps, generators, progress=False, options=None):
        self.check_sampler(sampler, num_steps)
        x = noise
        for i in range(num_steps):
            t = torch.full((len(x),), i / num_steps, device=x.device)
            x = x + denoise(x, t, **cond) / num_steps
        return x


@pytest.fixture
def toy_family():
    """Registers the toy family and process for one test, through the public registry calls."""
    saved = dict(ARCHITECTURES), dict(MODELS), dict(_PROCESSES)
    register_process("toy-flow", ToyFlow)
    register_family(TwoTower, {"Toy-S": _toy_factory()}, {"Toy-S-1-2": ("Toy-S", "encoder=1:3 decoder=1:2")})
    yield
    for live, old in zip((ARCHITECTURES, MODELS, _PROCESSES), saved):
        live.clear()
        live.update(old)


def _toy_factory():
    def make(**kwargs):
        return TwoTower(**{"encoder_depth": 3, "decoder_depth": 2, **kwargs})
    make.fixed, make.arch = {"encoder_depth": 3, "decoder_depth": 2}, "TwoTower"
    return make


def _toy_features(root: Path) -> FeatureDataset:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 32)
    latents = (labels[:, None, None, None, None] - 1.0 + 0.1 * rng.standard_normal((32, 1, 1, 4, 4)))
    write_features(root, latents.astype(np.float32), labels, 3)
    return FeatureDataset(root)


def test_a_new_family_runs_through_the_library(toy_family, tmp_path):
    model = MODELS["Toy-S"]().eval()
    depths = stack_depths(model)
    assert depths == {"encoder": 3, "decoder": 2} and len(flat_blocks(model)) == 5
    process = create_process(TwoTower.default_process(model.config))
    x, t, y = torch.randn(2, 1, 4, 4), torch.tensor([0.2, 0.7]), torch.tensor([0, 2])

    # gates over both stacks: a one-hot decision equals the pruned model, per-stack syntax included
    kept = parse_stack_indices(["encoder=2", "decoder=0"], depths)
    assert kept == [2, 3]
    gated = MODELS["Toy-S-1-2"]().eval()
    gated.model.load_state_dict(model.state_dict())
    assert gated.gates.groups == parse_stack_groups(["encoder=1:3", "decoder=1:2"], depths) == [(1, 3), (1, 2)]
    with torch.no_grad():
        gated.gates.logits[0].copy_(torch.tensor([0.0, 0.0, 5.0]))
        gated.gates.logits[1].copy_(torch.tensor([5.0, 0.0]))
        pruned = prune_depth(model, kept).eval()
        torch.testing.assert_close(gated(x, t, y), pruned(x, t, y), atol=0, rtol=0)
    assert pruned.config["encoder_depth"] == 1 and pruned.config["decoder_depth"] == 1

    # prune-by-index through the library: a self-describing file with the family, process and lineage
    save_model(tmp_path / "toy.pt", model)
    source = load_model(tmp_path / "toy.pt")
    assert source.arch == "TwoTower" and source.process == {"name": "toy-flow"}
    save_pruned(source, kept, str(tmp_path / "pruned.pt"), "index", logging.getLogger("test"))
    again = load_model(tmp_path / "pruned.pt")
    assert again.lineage["kept_indices"] == [2, 3] and again.lineage["source_depth"] == 5
    with torch.no_grad():
        torch.testing.assert_close(again.model(x, t, y), pruned(x, t, y), atol=0, rtol=0)

    # score criteria through the process
    dataset = _toy_features(tmp_path / "features")
    xb, yb = (torch.stack(v) for v in zip(*(dataset[(i, 0)] for i in range(8))))
    draws = process.draw(torch.Generator().manual_seed(0), 8, dataset.latent_shape, torch.device("cpu"))
    batches = [{"x": xb, "y": yb, "draws": draws}]
    sensitivity, count = loss_sensitivity(model, process, batches)
    influence, _ = block_influence(model, [(*process.model_input(xb, draws), yb)])
    assert count == 8 and sensitivity.shape == influence.shape == (5,)
    assert torch.isfinite(sensitivity).all() and (influence > 0).all()

    # a few training steps through the one training loop lower the process's loss
    env = init_distributed("cpu")
    (tmp_path / "run").mkdir()
    trainable = TwoTower()
    trainer = Trainer(env=env, model=trainable, param_groups=[{"params": list(trainable.parameters())}],
                      task=DiffusionTask(process), dataset=dataset,
                      config=TrainConfig(run_dir=tmp_path / "run", global_batch_size=16, total_steps=30, lr=3e-3,
                                         num_workers=0, log_every=30, ckpt_every=30, ema_decay=0.0),
                      process=process, settings={}, logger=logging.getLogger("test"), record=dict)
    before = process.training_losses(trainable.eval(), xb, draws, dict(y=yb))["loss"].mean().item()
    trainer.fit()
    after = process.training_losses(trainable.eval(), xb, draws, dict(y=yb))["loss"].mean().item()
    assert after < 0.5 * before

    # sampling through the process's own sampler, a function of per-image seeds
    spec = SamplingSpec.for_process(process, sampler=None, num_steps=None, cfg_scale=1.0)
    assert (spec.sampler, spec.num_steps) == ("euler", 8)
    batch = sample_latents(trainable, process, torch.tensor([0, 2]), [5, 6], spec)
    alone = sample_latents(trainable, process, torch.tensor([2]), [6], spec)
    assert batch.shape == (2, 1, 4, 4)
    assert_fp32_close(alone[0], batch[1], rel=LOOP_REL)  # 8 steps, each batched differently
    assert batch[1].mean() > batch[0].mean()  # class 2 sits at +1, class 0 at -1


#################################################################################
#                          The model contract, per family                       #
#################################################################################

class ModelContract(abc.ABC):
    """What every registered family must do; a family's test class says how to build a tiny one."""

    @abc.abstractmethod
    def tiny(self, seed: int = 0) -> nn.Module:
        """A tiny model of the family, with random (non-zero) weights."""

    @abc.abstractmethod
    def inputs(self, model: nn.Module):
        """Inputs that fit `model`, as `call` takes them (denoisers: (x, t, y))."""

    def call(self, model: nn.Module, inputs) -> torch.Tensor:
        """The model's output on `inputs` (denoisers: model(x, t, y))."""
        return model(*inputs)

    def test_output_shape(self):
        model = self.tiny().eval()
        inputs = self.inputs(model)
        with torch.no_grad():
            out = self.call(model, inputs)
        x = inputs[0]
        assert out.shape[0] == x.shape[0] and out.shape[2:] == x.shape[2:] and torch.isfinite(out).all()

    def test_self_describing_round_trip(self, tmp_path):
        model = self.tiny().eval()
        save_model(tmp_path / "m.pt", model)
        loaded = load_model(tmp_path / "m.pt")
        assert loaded.arch == model.arch and loaded.config == model.config
        assert loaded.process == create_process(type(model).default_process(model.config)).record()
        inputs = self.inputs(model)
        with torch.no_grad():
            torch.testing.assert_close(self.call(loaded.model, inputs), self.call(model, inputs), atol=0, rtol=0)

    def test_gates_cover_every_stack_and_equal_the_pruned_model(self):
        model = self.tiny().eval()
        depths = stack_depths(model)
        groups = " ".join(f"{name}={depth}:{depth}" for name, depth in depths.items())
        layout = [f"{name}=1:{depth}" for name, depth in depths.items()]
        gated = GatedModel(self.tiny(), parse_stack_groups(layout, depths)).eval()
        assert gated.gates.depth == sum(depths.values()) and groups
        with torch.no_grad():
            for logit in gated.gates.logits:
                logit.copy_(torch.arange(len(logit), dtype=torch.float32))  # keep the last block of each stack
        kept = gated.decisions()["kept_indices"]
        offsets = np.cumsum([0, *depths.values()])
        assert kept == [int(o) - 1 for o in offsets[1:]]
        inputs = self.inputs(model)
        with torch.no_grad():
            torch.testing.assert_close(self.call(gated, inputs), self.call(prune_depth(model, kept).eval(), inputs),
                                       atol=0, rtol=0)

    def test_gated_blocks_train_alike_under_checkpointing(self):
        """A family that checkpoints its blocks (`gradient_checkpointing`) recomputes them through
        models.stacks.checkpoint_block, gated by their own call's mask: the same output and gradients, bit for bit
        (the same kernels on the same inputs; tests/test_gate_checkpointing.py)."""
        def run(checkpointing):
            model = self.tiny()
            depths = stack_depths(model)
            gated = GatedModel(model, parse_stack_groups([f"{n}=1:{d}" for n, d in depths.items()], depths)).train()
            gated.model.gradient_checkpointing = checkpointing
            torch.manual_seed(0)  # the gate noise and the label dropout, drawn alike
            out = self.call(gated, self.inputs(model))
            out.square().mean().backward()
            return out.detach(), {name: p.grad for name, p in gated.named_parameters()}

        (plain, plain_grads), (out, grads) = run(False), run(True)
        assert torch.equal(out, plain)
        assert grads["gates.logits.0"].abs().max() > 0
        for name, grad in grads.items():
            assert (grad is None) == (plain_grads[name] is None), name
            if grad is not None:
                assert torch.equal(grad, plain_grads[name]), name

    def test_lora_attaches_and_discards(self):
        model = self.tiny().eval()
        original = {k: v.clone() for k, v in model.state_dict().items()}
        inputs = self.inputs(model)
        params = add_lora(model, rank=2)
        assert has_lora(model) and params and all(p.requires_grad for p in params)
        with torch.no_grad():
            for p in params:
                p.add_(0.1)
            changed = self.call(model, inputs)
        strip_lora(model)
        assert not has_lora(model) and set(model.state_dict()) == set(original)
        with torch.no_grad():
            assert not torch.equal(changed, self.call(model, inputs))
        for k, v in model.state_dict().items():
            assert torch.equal(v, original[k])


class TestDiTContract(ModelContract):
    def tiny(self, seed: int = 0) -> nn.Module:
        return tiny_dit(seed=seed)

    def inputs(self, model):
        g = torch.Generator().manual_seed(1)
        return torch.randn(2, 4, 8, 8, generator=g), torch.tensor([3, 700]), torch.tensor([1, 5])


class TestSiTContract(ModelContract):
    def tiny(self, seed: int = 0) -> nn.Module:
        from helpers import tiny_sit
        return tiny_sit(seed=seed)

    def inputs(self, model):
        g = torch.Generator().manual_seed(1)
        return torch.randn(2, 4, 8, 8, generator=g), torch.tensor([0.3, 0.9]), torch.tensor([1, 5])

    def test_a_dit_file_loads_as_sit_and_a_bare_one_needs_model(self, tmp_path):
        from models import create_model

        dit = create_model("DiT-Nano/2", input_size=8, num_classes=10)
        save_model(tmp_path / "dit.pt", dit)
        as_sit = load_model(tmp_path / "dit.pt", "SiT-Nano/2")
        assert as_sit.arch == "SiT" and as_sit.process["name"] == "transport"  # DiT's process does not carry over
        save_model(tmp_path / "sit.pt", as_sit.model, process=as_sit.process)
        assert load_model(tmp_path / "sit.pt").arch == "SiT"
        torch.save(dit.state_dict(), tmp_path / "bare.pt")
        with pytest.raises(ValueError, match="fits several families .*--model"):
            load_model(tmp_path / "bare.pt")
        assert load_model(tmp_path / "bare.pt", "SiT-Nano/2").arch == "SiT"
        assert load_model(tmp_path / "bare.pt", "DiT-Nano/2").arch == "DiT"


def test_every_registered_family_has_a_contract_test():
    covered = {cls.__name__.removeprefix("Test").removesuffix("Contract") for cls in ModelContract.__subclasses__()}
    assert set(ARCHITECTURES) <= covered, f"families without a contract test: {set(ARCHITECTURES) - covered}"


def test_bare_state_dicts_never_guess_between_families(toy_family, tmp_path):
    """With a second family whose layout fits the same keys, a bare state dict needs --model."""
    class Twin(type(tiny_dit())):
        arch = "Twin"

    register_family(Twin, {})  # the toy_family fixture restores the registry afterwards
    torch.save(tiny_dit().state_dict(), tmp_path / "bare.pt")
    with pytest.raises(ValueError, match="fits several families .*--model"):
        load_model(tmp_path / "bare.pt", num_heads=2)


class TestMARContract(ModelContract):
    """MAR is called through its masked-token process: the output is the diffusion MLP's (B, R, 2C)."""

    def tiny(self, seed: int = 0) -> nn.Module:
        from helpers import tiny_mar
        return tiny_mar(seed=seed)

    def inputs(self, model):
        g = torch.Generator().manual_seed(1)
        process = create_process(type(model).default_process(model.config))
        x = torch.randn(2, *model.data_shape, generator=g)
        return x, process.draw(g, 2, model.data_shape, torch.device("cpu")), dict(y=torch.tensor([1, 5]))

    def call(self, model, inputs):
        x, draws, cond = inputs
        process = create_process(type(unwrap(model)).default_process(unwrap(model).config))
        return process.predict(model, x, draws, cond).output

    def test_output_shape(self):
        model = self.tiny().eval()
        inputs = self.inputs(model)
        with torch.no_grad():
            out = self.call(model, inputs)
        rows = model.diffusion_batch_mul * model.seq_len
        assert out.shape == (2, rows, 2 * model.token_embed_dim) and torch.isfinite(out).all()
