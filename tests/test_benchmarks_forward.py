"""benchmarks/forward.py's measures of the hardware (issue 24): FLOPs with attention, the matmul peak, the profiler's
shares; and benchmarks/training.py's peak memory with and without activation checkpointing."""

import json

import pytest
import torch
from helpers import one_line_error, run_cli


def dit_flops(depth: int, hidden: int, tokens: int, channels: int = 4, patch: int = 2) -> int:
    """A DiT forward by hand (2 FLOPs per multiply-add, learn_sigma: 2 * channels out): the patch embedding, the
    timestep MLP (256 frequencies), per block adaLN (6 vectors), qkv, attention (q k^T and a v over every pair
    of tokens), the projection and the MLP (4x), then the final layer's adaLN (2 vectors) and linear."""
    D, T = hidden, tokens
    embed = 2 * T * channels * patch**2 * D + 2 * 256 * D + 2 * D * D
    block = 2 * D * 6 * D + 2 * T * D * 3 * D + 2 * 2 * T * T * D + 2 * T * D * D + 2 * 2 * T * D * 4 * D
    final = 2 * D * 2 * D + 2 * T * D * patch**2 * 2 * channels
    return embed + depth * block + final


def _model(name: str, input_size: int, device: str = "cpu", attention: dict | None = None, path: str = "auto"):
    from models import create_model
    from models.attention import convert_attention, set_attention_path

    with torch.device(device):
        model = create_model(name, input_size=input_size).eval()
    if attention:
        convert_attention(model, attention)
    set_attention_path(model, path)
    return model


def _call(model, batch: int, device: str = "cpu"):
    from benchmarks.harness import BenchModel, default_process_record, forward_call

    return forward_call(BenchModel("m", model, model.arch, dict(model.config), default_process_record(model)), batch,
                        torch.device(device))


def _count(name: str, input_size: int, device: str, attention: dict | None = None, path: str = "auto") -> int:
    from benchmarks.harness import forward_flops

    model = _model(name, input_size, device, attention, path)
    return forward_flops(_call(model, 1, device), model)


def test_the_flops_count_attention_on_every_device():
    """torch's counter counts SDPA on the meta device only; the harness counts it on CPU too. DiT-XL/2 at 256 px
    (32 x 32 latents, 256 tokens) is the issue's 237.2 GFLOP (the paper's 118.6 GFLOPs are multiply-adds)."""
    expected = dit_flops(depth=8, hidden=64, tokens=16)  # DiT-Nano/2 at 8 x 8 latents
    assert _count("DiT-Nano/2", 8, "cpu") == _count("DiT-Nano/2", 8, "meta") == expected
    assert _count("DiT-XL/2", 32, "meta") == dit_flops(depth=28, hidden=1152, tokens=256) == 237_242_843_136


def test_local_attention_counts_what_its_path_computes():
    """A 4 x 4 token grid, radius 2 with keys pooled 2 x 2 (4 more keys, read by every query): dense reads all
    16 + 4 keys; tiled one tile (tiles are at most the grid's side) over a window of 4 + 2 halo = 6 x 6 plus the
    pooled keys; flex its one 128 x 128 block. FlexAttention does not run under the counter: the count runs the
    dense path in its place, and gives the model its path back."""
    from benchmarks.harness import forward_flops
    from models.attention import attention_modules

    local = {"kind": "local", "radius": 2, "pool": 2}
    heads, head_dim, depth = 4, 16, 8
    base = dit_flops(depth=depth, hidden=64, tokens=16) - depth * 4 * heads * head_dim * 16 * 16  # no attention
    for path, queries, keys in [("dense", 16, 16 + 4), ("tiled", 16, 36 + 4), ("flex", 16, 128 * 128 / 16)]:
        for device in ("cpu", "meta"):
            assert _count("DiT-Nano/2", 8, device, local, path) == base + depth * 4 * heads * head_dim * queries * keys

    model = _model("DiT-Nano/2", 8, attention=local, path="flex")
    forward_flops(_call(model, 2), model)
    assert all(m.path == "flex" and not m._forward_pre_hooks for m in attention_modules(model))


def test_the_peak_and_the_profiler_shares():
    from benchmarks.harness import matmul_peak, profile_shares

    peak = matmul_peak(torch.device("cpu"), ["fp32", "bf16"], 64, 1, 2)
    assert set(peak) == {"fp32", "bf16"} and all(v > 0 for v in peak.values())

    call = _call(_model("DiT-Nano/2", 8), 2)
    with torch.no_grad():
        shares = profile_shares(call, torch.device("cpu"))
    assert 0 < shares["matmul_share"] < 1 and 0 < shares["attention_share"] < 1  # the blocks' linears, SDPA
    assert shares["matmul_attention_share"] == pytest.approx(shares["matmul_share"] + shares["attention_share"])
    assert shares["matmul_attention_share"] + shares["other_share"] == pytest.approx(1, abs=1e-9)
    top = [op["share"] for op in shares["profile"]["top_other"]]
    assert top == sorted(top, reverse=True) and sum(top) <= shares["other_share"] + 1e-9
    assert not any(op["op"] in ("aten::addmm", "aten::linear") for op in shares["profile"]["top_other"])

    # on the inference path a CPU with oneDNN's bf16 kernels runs the MLP's linear and GELU as one oneDNN op,
    # counted as matmul: no GELU, no linear among the other ops
    from models.inference import ONEDNN_BF16, hold_weights

    held = hold_weights(_model("DiT-Nano/2", 8), torch.bfloat16)
    with torch.no_grad():
        shares = profile_shares(_call(held, 2), torch.device("cpu"))
    others = {op["op"] for op in shares["profile"]["top_other"]}
    assert 0 < shares["matmul_share"] < 1 and not others & {"aten::addmm", "aten::linear", "mkldnn::_linear_pointwise"}
    assert ("aten::gelu" in others) == (not ONEDNN_BF16)


def test_the_forward_benchmark_reports_the_peak_and_each_rows_fraction(tmp_path):
    out = tmp_path / "forward.json"
    proc = run_cli(["-m", "benchmarks.forward", "--models", "DiT-Nano/2", "DiT-Nano/4", "--image-size", "64",
                    "--batch-sizes", "2", "--precisions", "fp32", "bf16", "--peak-size", "64", "--warmup", "0",
                    "--repeats", "2", "--device", "cpu", "--out", str(out)])
    result = json.loads(out.read_text())
    peak = result["matmul_peak"]
    assert peak["size"] == 64 and set(peak["gflops_per_s"]) == {"fp32", "bf16"}
    assert all(v > 0 for v in peak["gflops_per_s"].values())
    # measured at the start and the end: the faster of the two is the peak of every row
    assert all(peak["gflops_per_s"][p] >= peak["at_end"][p] for p in ("fp32", "bf16"))
    assert "matmul peak (64^3 GEMM, fastest of 2 calls): fp32 " in proc.stdout
    assert "(the faster of the start and the end of the run; end: fp32 " in proc.stdout
    assert [(r["model"], r["precision"], r["path"]) for r in result["forward"]] == [
        ("DiT-Nano/2", "fp32", "fp32"), ("DiT-Nano/4", "fp32", "fp32"), ("DiT-Nano/2", "bf16", "held"),
        ("DiT-Nano/4", "bf16", "held"), ("DiT-Nano/2", "bf16", "autocast"), ("DiT-Nano/4", "bf16", "autocast")]
    for r in result["forward"]:
        patch = 2 if r["model"] == "DiT-Nano/2" else 4  # 8 x 8 latents: 16 or 4 tokens
        assert r["gflops"] * 1e9 == pytest.approx(2 * dit_flops(8, 64, (8 // patch) ** 2, patch=patch), rel=1e-12)
        assert r["gflops_per_s"] == pytest.approx(r["gflops"] * 1e3 / r["latency_ms"], rel=1e-12)
        assert r["peak_fraction"] == pytest.approx(r["gflops_per_s"] / peak["gflops_per_s"][r["precision"]], rel=1e-12)
        for key in ("matmul_share", "attention_share", "matmul_attention_share", "other_share"):
            assert 0 <= r[key] <= 1, key
        assert r["matmul_share"] + r["attention_share"] + r["other_share"] == pytest.approx(1, abs=1e-9)
        assert r["profile"]["timer"] == "self CPU time" and r["profile"]["top_other"]


def test_the_training_benchmark_compares_activation_checkpointing(tmp_path):
    """--grad-checkpointing both: every task without, then with checkpointing. DiT-Nano/2 at 256 px (256 tokens),
    batch 16: its blocks' activations outweigh its weights (3 MiB), and checkpointing keeps only each block's input
    (measured, the steps' own memory: 240-350 MiB without, 115-140 MiB with)."""
    out = tmp_path / "training.json"
    run_cli(["-m", "benchmarks.training", "--model", "DiT-Nano/2", "--image-size", "256", "--batch-size", "16",
             "--grad-checkpointing", "both", "--warmup", "0", "--repeats", "1", "--device", "cpu", "--out", str(out)])
    result = json.loads(out.read_text())
    tasks = ["train", "kd", "prune-lora", "prune-full"]
    assert [(r["task"], r["grad_checkpointing"]) for r in result["rows"]] == (
        [(t, False) for t in tasks] + [(t, True) for t in tasks])
    rows = {(r["task"], r["grad_checkpointing"]): r for r in result["rows"]}
    for task in ("prune-lora", "prune-full"):  # against the train step of the same setting
        for on in (False, True):
            assert rows[task, on]["vs_train"] == pytest.approx(rows[task, on]["seconds_per_step"]
                                                               / rows["train", on]["seconds_per_step"], rel=1e-12)
    assert result["memory"] == "process peak RSS, reset at the start"  # Linux: the mark reset per task
    for task in ("train", "prune-lora", "prune-full"):
        assert rows[task, True]["step_mib"] < 0.8 * rows[task, False]["step_mib"], task


def test_the_training_benchmark_compares_compiled_steps(tmp_path):
    """--compile both: every task uncompiled, then with the trained model's forward compiled (here by dynamo with
    the eager backend, which captures the graph without generating code: the check that the tasks compile, cheaply);
    the compiled row's first step is timed apart and its speed compared with the uncompiled row of its task."""
    out = tmp_path / "training.json"
    run_cli(["-m", "benchmarks.training", "--model", "DiT-Nano/2", "--image-size", "64", "--batch-size", "4",
             "--compile", "both", "--compile-backend", "eager", "--tasks", "train", "prune-lora", "--warmup", "0",
             "--repeats", "1", "--device", "cpu", "--out", str(out)])
    result = json.loads(out.read_text())
    tasks = ["train", "prune-lora"]
    assert [(r["task"], r["compile"]) for r in result["rows"]] == (
        [(t, False) for t in tasks] + [(t, True) for t in tasks])
    rows = {(r["task"], r["compile"]): r for r in result["rows"]}
    for task in tasks:
        eager, compiled = rows[task, False], rows[task, True]
        assert "compile_s" not in eager and "compile_speedup" not in eager
        assert compiled["compile_backend"] == "eager" and compiled["compile_s"] > 0
        assert compiled["compile_speedup"] == pytest.approx(eager["seconds_per_step"] / compiled["seconds_per_step"],
                                                            rel=1e-12)


def test_the_training_benchmark_refuses_what_does_not_compile(tmp_path):
    """Before any task runs: gated blocks under checkpointing, and MAR (data-dependent shapes)."""
    base = ["-m", "benchmarks.training", "--image-size", "64", "--batch-size", "2", "--device", "cpu",
            "--compile", "on", "--out", str(tmp_path / "t.json")]
    proc = run_cli([*base, "--model", "DiT-Nano/2", "--grad-checkpointing", "both"], check=False)
    one_line_error(proc, 2, "--compile on", "--grad-checkpointing both", "gated blocks")
    proc = run_cli([*base, "--model", "MAR-Nano", "--tasks", "train"], check=False)
    one_line_error(proc, 2, "--compile", "MAR")
    assert not (tmp_path / "t.json").exists()
