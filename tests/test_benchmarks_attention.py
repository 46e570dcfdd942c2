"""benchmarks/attention.py (issue 22): its FLOPs are the formulas, its speedups the ratios of its times."""

import json
import math

import pytest
from helpers import ROOT, run_cli


def test_the_circle_counts_the_keys_of_the_mask():
    """The ideal key count is the definition's: the mask's keys per query, averaged, on square and oblong grids."""
    from benchmarks.attention import circle_keys
    from models.attention import local_mask

    for grid in [(1, 1), (3, 3), (5, 9), (16, 16)]:
        for radius in (1, 1.2, 1.5, 2, 3.7, 8):
            mask = local_mask(grid, radius)
            assert circle_keys(grid, radius) == pytest.approx(mask.sum().item() / mask.shape[0], rel=1e-12)


def _attention_flops(queries, keys, heads, head_dim):
    return 4 * heads * head_dim * queries * keys  # q k^T and a v: 2 FLOPs per multiply-add, each


def test_the_benchmark_through_its_command_line(tmp_path):
    from models import create_model

    out, md = tmp_path / "attention.json", tmp_path / "attention.md"
    proc = run_cli(["-m", "benchmarks.attention", "--grids", "4", "6", "--radii", "1", "1.5", "--heads", "2x8",
                    "--models", "DiT-Nano/2", "--precisions", "fp32", "bf16", "--paths", "tiled", "dense",
                    "--dense-max-mib", "0.001", "--max-forward-tflops", "2e-5", "--warmup", "0", "--repeats", "1",
                    "--device", "cpu", "--out", str(out), "--markdown", str(md)], timeout=300)
    result = json.loads(out.read_text())
    for key in ("device", "device_name", "threads", "torch", "batch", "operation", "forward", "skipped"):
        assert key in result, key
    assert f"On {result['device_name']}" in proc.stdout and md.read_text().strip() in proc.stdout

    # the operation: 2 grids x 2 precisions, global + (tiled, dense) per radius; dense skipped at 6x6 (its
    # 36 x 36 mask is 1296 bytes, over 0.001 MiB; 4 x 4: 256 bytes)
    rows = result["operation"]
    assert [(r["grid"], r["precision"], r["attention"], r["path"]) for r in rows[:5]] == [
        (4, "fp32", "global", "sdpa"), (4, "fp32", "local r=1", "tiled"), (4, "fp32", "local r=1", "dense"),
        (4, "fp32", "local r=1.5", "tiled"), (4, "fp32", "local r=1.5", "dense")]
    assert len(rows) == 2 * 5 + 2 * 3 and not any(r["grid"] == 6 and r["path"] == "dense" for r in rows)
    assert any("dense path at 6x6" in s for s in result["skipped"])
    for r in rows:
        G, T = r["grid"], r["grid"] ** 2
        assert (r["num_heads"], r["head_dim"], r["tokens"], r["pixels"]) == (2, 8, T, 16 * G)
        if r["attention"] == "global":
            ideal = T
        elif r["radius"] == 1:  # the query itself
            ideal = 1
        else:  # radius 1.5: the 3 x 3 square (diagonals at sqrt(2) < 1.5), clipped at the edges
            ideal = (3 - 2 / G) ** 2
        assert r["ideal_keys"] == pytest.approx(ideal, rel=1e-12)
        if r["path"] == "tiled":  # tiles of 8 (at most the grid) read a window of tile + 2 (ceil(r) - 1)
            tile = min(8, G)
            queries, keys = math.ceil(G / tile) ** 2 * tile**2, (tile + 2 * (math.ceil(r["radius"]) - 1)) ** 2
        else:  # global and dense: every key
            queries, keys = T, T
        assert (r["queries"], r["keys"]) == (queries, keys)
        assert r["gflops"] * 1e9 == pytest.approx(_attention_flops(queries, keys, 2, 8), rel=1e-12)
        assert r["ideal_gflops"] * 1e9 == pytest.approx(_attention_flops(T, ideal, 2, 8), rel=1e-12)
        base = next(b for b in rows if (b["grid"], b["precision"], b["attention"]) == (G, r["precision"], "global"))
        assert r["speedup"] == pytest.approx(base["ms"] / r["ms"], rel=1e-12)
        assert r["ideal_speedup"] == pytest.approx(T / ideal, rel=1e-12)

    # the forward: DiT-Nano/2 at 4x4 only (at 6x6 its global forward is 32 MFLOPs, over the cap of 20)
    rows = result["forward"]
    assert {r["grid"] for r in rows} == {4} and len(rows) == 2 * 5
    assert any("DiT-Nano/2 forward at 6x6" in s and "--max-forward-tflops" in s for s in result["skipped"])
    model = create_model("DiT-Nano/2", input_size=8)
    depth, heads, head_dim = len(model.blocks), model.blocks[0].attn.num_heads, model.blocks[0].attn.head_dim
    for r in rows:
        base = next(b for b in rows if (b["precision"], b["attention"]) == (r["precision"], "global"))
        keys = (4 + 2 * (math.ceil(r["radius"]) - 1)) ** 2 if r["path"] == "tiled" else 16  # one 4 x 4 tile
        extra = depth * (_attention_flops(16, keys, heads, head_dim) - _attention_flops(16, 16, heads, head_dim))
        assert (r["gflops"] - base["gflops"]) * 1e9 == pytest.approx(extra, abs=1.0)  # the rest of the model alike
        assert r["speedup"] == pytest.approx(base["ms"] / r["ms"], rel=1e-12)
        assert r["ideal_speedup"] == pytest.approx(base["gflops"] / r["ideal_gflops"], rel=1e-12)
    assert "| model | grid |" in proc.stdout and "| heads | grid |" in proc.stdout


def test_the_benchmark_is_documented_and_ends_through_run_script():
    """What tests/test_texts.py holds every benchmark module to, and the README's table of it."""
    source = (ROOT / "benchmarks" / "attention.py").read_text()
    assert "run_script(main, parse_args)" in source.split('if __name__ == "__main__":', 1)[1]
    assert "--sampling-steps" not in source
    assert "python -m benchmarks.attention" in (ROOT / "README.md").read_text()
    assert "`attention`" in (ROOT / "docs" / "ARCHITECTURE.md").read_text()


def test_models_without_local_attention_are_refused_before_any_work(tmp_path):
    from benchmarks.attention import main, parse_args
    from tinyfusion.errors import UserError

    out = tmp_path / "attention.json"
    for flags, message in [(["--models", "MAR-B", "--heads"], "--models MAR-B: a MAR"),
                           (["--models", "DiT-XL-1-2", "--heads"], "gated training preset"),
                           (["--heads", "MAR-B", "--models"], "--heads MAR-B: .* no head shape")]:
        with pytest.raises(UserError, match=message):
            main(parse_args([*flags, "--out", str(out)]))
    assert not out.exists()
