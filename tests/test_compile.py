"""--compile (models/compiling.py): the scripts' compiled runs compute what the uncompiled ones compute, and what
cannot be compiled as one graph is refused in one line, never run eagerly in silence.

The backends are eager (dynamo captures the graph and runs it with the same ops) and aot_eager (forward and backward
traced by AOTAutograd, no code generation): what inductor compiles, without its minute of C++ compilation. Every
run goes through a script's command line: sample.py's and train.py's compiled runs in a process of their own, as a
user runs them; the others in this process (`run_script`: the same parsing, main and one-line errors), which saves
starting one each. The whole file takes about 35 s on 2 shared vCPUs.
"""

import json
import os
import time

import pytest
import torch
from helpers import run_cli, tiny_dit, tiny_mar, tiny_sit, write_features
from helpers.tolerance import assert_fp32_close

import prune_by_learning
import sample
import sample_ddp
import train
import train_masked_kd
from tinyfusion.checkpoint import read_checkpoint, save_model
from tinyfusion.cli import run_script
from tinyfusion.errors import UserError
from tinyfusion.options import TrainOptions
from tinyfusion.synthetic import class_pattern_latents
from tinyfusion.vae import codec_record

PIXELS = codec_record("none", 1.0)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Pixel-space checkpoints (8x8 RGB, no VAE to load): a DiT and a SiT of depth 2, a tiny MAR; 32 images of class
    patterns of the DiT's shape."""
    root = tmp_path_factory.mktemp("compile")
    save_model(root / "dit.pt", tiny_dit(in_channels=3, depth=2), codec=PIXELS)
    save_model(root / "sit.pt", tiny_sit(in_channels=3, depth=2), codec=PIXELS)
    save_model(root / "mar.pt", tiny_mar(), codec=PIXELS)
    latents, labels = class_pattern_latents(32, (3, 8, 8))
    write_features(root / "features", latents, labels, 10)
    return root


def _in_process(script, argv, capsys) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of a script run in this process, as its __main__ runs it."""
    with pytest.raises(SystemExit) as exit_info:
        run_script(script.main, script.parse_args, argv)
        raise SystemExit(0)
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


@pytest.mark.parametrize("family, sampler, own_process", [("dit", ["--sampler", "ddim"], True),
                                                          ("sit", ["--sampler", "ode", "--sampling-method", "heun"],
                                                           False)])
def test_sample_py_compiled_writes_the_same_image_bytes(files, tmp_path, family, sampler, own_process, capsys):
    """Guided sampling (cfg 4: forward_with_cfg on the doubled batch, then the guided mix) compiled as one graph
    (SiT's compiled run in this process too: the same script, without the cost of starting one)."""
    argv = ["--ckpt", str(files / f"{family}.pt"), *sampler, "--num-sampling-steps", "3", "--cfg-scale", "4",
            "--device", "cpu", "--class-labels", "1", "2", "3"]
    assert _in_process(sample, [*argv, "--out", str(tmp_path / "eager.png")], capsys)[0] == 0
    compiled = [*argv, "--out", str(tmp_path / "compiled.png"), "--compile", "--compile-backend", "eager"]
    out = run_cli(["sample.py", *compiled]).stdout if own_process else _in_process(sample, compiled, capsys)[1]
    line, = [line for line in out.splitlines() if "torch.compile:" in line]  # one line, at the first call
    arch = {"dit": "DiT", "sit": "SiT"}[family]
    assert f"the {arch}'s sampling step (forward_with_cfg at scale 4, fp32), backend eager, mode default, one graph " \
           "(fullgraph); first call" in line
    assert (tmp_path / "compiled.png").read_bytes() == (tmp_path / "eager.png").read_bytes()


def test_sample_ddp_compiles_once_and_records_the_backend(files, tmp_path, capsys):
    """Two batches through one compiled denoiser (compiled at the first call only), the .npz byte for byte the
    uncompiled one's; the protocol records the backend, so resuming the folder without --compile is refused."""
    argv = ["--ckpt", str(files / "dit.pt"), "--sampler", "ddim", "--num-sampling-steps", "2", "--device", "cpu",
            "--num-fid-samples", "4", "--per-proc-batch-size", "2"]
    compiled = ["--compile", "--compile-backend", "eager"]
    for run, flags in (("eager", []), ("compiled", compiled)):
        status, out, _ = _in_process(sample_ddp, [*argv, *flags, "--sample-dir", str(tmp_path / run), "--npz",
                                                  str(tmp_path / f"{run}.npz")], capsys)
        assert status == 0 and out.count("torch.compile: the DiT's sampling step") == (1 if flags else 0)
    assert (tmp_path / "compiled.npz").read_bytes() == (tmp_path / "eager.npz").read_bytes()
    assert json.loads((tmp_path / "compiled.json").read_text())["compile"] == "eager"
    assert "compile" not in json.loads((tmp_path / "eager.json").read_text())

    status, _, err = _in_process(sample_ddp, [*argv, "--sample-dir", str(tmp_path / "compiled"), "--npz",
                                           str(tmp_path / "again.npz")], capsys)
    assert status == 2 and "holds samples of another protocol" in err and "compile: 'eager' recorded, None now" in err


def test_train_py_compiled_trains_the_same_weights_under_their_own_names(files, tmp_path, capsys):
    """aot_eager traces forward and backward (AOTAutograd) and runs the same aten ops: the losses, the weights and
    the EMA match the uncompiled run (measured bitwise; asserted at one evaluation's tolerance, KERNEL_REL, as the
    traced backward may sum a parameter's gradient contributions in another order). The compiled run also
    checkpoints its blocks (--grad-checkpointing, torch's default recomputation context, which dynamo traces).
    The files keep the model's keys: no `_orig_mod.` of torch.compile."""
    common = ["--load-weight", str(files / "dit.pt"), "--data-path", str(files / "features"), "--results-dir",
              str(tmp_path), "--global-batch-size", "8", "--num-workers", "0", "--max-steps", "3", "--log-every", "1",
              "--lr", "1e-3", "--device", "cpu"]
    assert _in_process(train, [*common, "--prefix", "eager", "--save-model", str(tmp_path / "eager.pt")],
                       capsys)[0] == 0
    proc = run_cli(["train.py", *common, "--prefix", "compiled", "--save-model", str(tmp_path / "compiled.pt"),
                    "--compile", "--compile-backend", "aot_eager", "--grad-checkpointing"])
    assert "torch.compile: the DiT's training forward, backend aot_eager" in proc.stdout

    def losses(run):
        return [json.loads(line)["loss"] for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]

    assert len(losses("compiled")) == 3
    assert_fp32_close(torch.tensor(losses("compiled")), torch.tensor(losses("eager")))
    for name in ("eager.pt", "compiled.pt", "compiled/checkpoints/step-0000003.pt"):
        assert not any("_orig_mod" in k for k in read_checkpoint(tmp_path / name)["model"])
    eager, compiled = (read_checkpoint(tmp_path / f"{run}.pt") for run in ("eager", "compiled"))
    for weights in ("model", "ema"):
        assert list(compiled[weights]) == list(eager[weights])
        for key, value in eager[weights].items():
            assert_fp32_close(compiled[weights][key], value, msg=f"{weights} {key}")


def test_train_masked_kd_compiled_records_the_same_blocks(files, tmp_path, capsys):
    """Masked KD's feature loss reads the student's blocks through forward hooks inside the compiled forward: the
    same output KD, feature loss and total as uncompiled."""
    save_model(tmp_path / "student.pt", tiny_dit(seed=1, in_channels=3, depth=2), codec=PIXELS)
    common = ["--load-weight", str(tmp_path / "student.pt"), "--load-teacher", str(files / "dit.pt"), "--layer-map",
              "0:0,1:1", "--data-path", str(files / "features"), "--results-dir", str(tmp_path), "--global-batch-size",
              "8", "--num-workers", "0", "--max-steps", "2", "--log-every", "1", "--device", "cpu"]
    for run, flags in (("eager", []), ("compiled", ["--compile", "--compile-backend", "eager"])):
        assert _in_process(train_masked_kd, [*common, *flags, "--prefix", run], capsys)[0] == 0
    logged = {run: [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
              for run in ("eager", "compiled")}
    for key in ("kd", "feat", "gt", "loss"):
        assert all(r[key] > 0 for r in logged["eager"]), key
        assert_fp32_close(torch.tensor([r[key] for r in logged["compiled"]]),
                          torch.tensor([r[key] for r in logged["eager"]]), msg=key)


def test_prune_by_learning_compiles_its_gates_and_refuses_checkpointed_gates(files, tmp_path, capsys):
    """The gated model (per-sample Gumbel decisions in forward hooks, the temperature annealed every step: one
    recompilation, then a dynamic float) compiled: the same decision and losses. Gated blocks recomputed in the
    context of their call's mask (--grad-checkpointing) cannot be traced: one line."""
    common = ["--load-weight", str(files / "dit.pt"), "--data-path", str(files / "features"), "--groups", "1x1:2",
              "--delta-w", "--results-dir", str(tmp_path), "--global-batch-size", "8", "--num-workers", "0",
              "--max-steps", "3", "--log-every", "1", "--lr", "1e-3", "--device", "cpu"]
    runs = {"eager": [], "compiled": ["--compile", "--compile-backend", "eager"]}
    for run, flags in runs.items():
        status, _, _ = _in_process(prune_by_learning, [*common, *flags, "--prefix", run, "--save-model",
                                                    str(tmp_path / f"{run}.pt")], capsys)
        assert status == 0
    decisions = {run: json.loads((tmp_path / run / "decisions.json").read_text()) for run in runs}
    assert decisions["compiled"]["kept_indices"] == decisions["eager"]["kept_indices"]
    logged = {run: [json.loads(line) for line in (tmp_path / run / "decisions.jsonl").read_text().splitlines()]
              for run in runs}
    assert_fp32_close(torch.tensor([r["loss"] for r in logged["compiled"]]),
                      torch.tensor([r["loss"] for r in logged["eager"]]))

    status, _, err = _in_process(prune_by_learning, [*common, *runs["compiled"], "--grad-checkpointing", "--prefix",
                                                  "refused", "--save-model", str(tmp_path / "refused.pt")], capsys)
    assert status == 2 and len(err.strip().splitlines()) == 1
    assert "--compile: gated blocks under --grad-checkpointing" in err
    assert "drop --grad-checkpointing or --compile" in err
    assert not (tmp_path / "refused").exists() and not (tmp_path / "refused.pt").exists()


def test_mar_is_refused_in_one_line_before_anything_is_written(files, tmp_path, capsys):
    for script, argv in [(sample, ["--out", str(tmp_path / "grid.png")]),
                         (sample_ddp, ["--num-fid-samples", "2", "--per-proc-batch-size", "2", "--sample-dir",
                                       str(tmp_path / "samples")])]:
        status, _, err = _in_process(script, ["--ckpt", str(files / "mar.pt"), "--device", "cpu", "--compile",
                                           "--compile-backend", "eager", *argv], capsys)
        assert status == 2 and len(err.strip().splitlines()) == 1
        assert "error: --compile: MAR keeps the visible tokens of a random masking order" in err
        assert "run it without --compile (which is for DiT and SiT)" in err
    assert not (tmp_path / "grid.png").exists() and not (tmp_path / "samples").exists()


class _Breaks(torch.nn.Module):
    """A forward with code dynamo does not trace (an explicit graph break): compiled whole, it cannot run."""

    arch = "Breaks"

    def forward(self, x):
        x = x + 1
        torch._dynamo.graph_break()
        return x * 2


def test_a_graph_break_or_the_recompile_limit_is_an_error_not_eager_code(monkeypatch):
    """And a backend that is not one, or a backend without --compile (a flag that would change nothing)."""
    from models.compiling import CompiledModel, fail_at_recompile_limit

    model = CompiledModel(_Breaks(), backend="eager", what="the test's forward")
    with pytest.raises(UserError, match=r"^--compile: the test's forward does not compile as one graph \(.*, at "
                                        r".*test_compile\.py:\d+\); run without --compile$"):
        model(torch.ones(2))

    calls = []
    plain = CompiledModel(torch.nn.Identity(), backend="eager", what="the identity", log=calls.append)
    assert torch.equal(plain(torch.ones(2)), torch.ones(2)) and len(calls) == 1  # one line, at the first call
    assert plain.call.first_call_seconds > 0
    import torch._dynamo.config as dynamo_config

    fail_at_recompile_limit()  # what compiling sets: at least RECOMPILE_LIMIT graphs, then an error
    assert dynamo_config.fail_on_recompile_limit_hit and dynamo_config.recompile_limit >= 64
    monkeypatch.setattr(dynamo_config, "recompile_limit", 1)  # a limit this test reaches: one graph
    with pytest.raises(UserError, match=r"^--compile: the identity needed more than 64 graphs"):
        plain(torch.ones(2, 3))  # another rank: a second graph

    with pytest.raises(UserError, match="--compile-backend 'tvm' is not one of inductor, aot_eager, eager"):
        CompiledModel(torch.nn.Identity(), backend="tvm", what="x")
    with pytest.raises(UserError, match="--compile-backend eager chooses how --compile compiles: add --compile"):
        TrainOptions(compile_backend="eager").compiled_with()
    assert TrainOptions(compile=True, compile_backend="aot_eager").compiled_with() == "aot_eager"


@pytest.mark.skipif(os.environ.get("TINYFUSION_TEST_INDUCTOR") != "1",
                    reason="a cold inductor compile of a tiny DiT takes about a minute on 2 cores (53 s measured); "
                           "set TINYFUSION_TEST_INDUCTOR=1 to run it")
def test_inductor_compiles_a_tiny_dit_forward(tmp_path, monkeypatch):
    """The one backend that generates code, from a cold cache (TORCHINDUCTOR_CACHE_DIR in tmp_path): a DiT of depth 2
    on 8x8 RGB, guided, equal to the eager model at one evaluation's tolerance (inductor fuses and reorders the sums).
    Measured cold on 2 shared vCPUs of an Intel Xeon (AMX): 53 s, most of it compiling the C++ kernels; 5 s warm."""
    from tinyfusion.sampling import SamplingSpec, make_denoiser

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    model = tiny_dit(in_channels=3, depth=2).eval()
    spec = SamplingSpec("ddim", 2, cfg_scale=4.0)
    x, t, y = torch.randn(2, 3, 8, 8), torch.tensor([10, 500]), torch.tensor([1, 2])
    start = time.perf_counter()
    with torch.no_grad():
        compiled = make_denoiser(model, spec, "cpu", compile_backend="inductor")(x, t, y)
        expected = make_denoiser(model, spec, "cpu")(x, t, y)
    assert time.perf_counter() - start < 300
    assert_fp32_close(compiled, expected)
