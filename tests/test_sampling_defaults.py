"""What a user meets with no flags: every family samples from its file alone, grayscale pixel models run end
to end, and an internal error keeps its traceback while a user error stays one line."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import ROOT, one_line_error, run_cli, tiny_dit
from PIL import Image

from models import ARCHITECTURES, MODELS, create_model, unwrap
from processes import create_process
from tinyfusion.checkpoint import load_model, save_model
from tinyfusion.vae import codec_record

PIXELS = codec_record("none", 1.0)


def _smallest_name(arch: str) -> str:
    """The registry's smallest plain model of a family (its -Nano size)."""
    names = [n for n, f in MODELS.items() if getattr(f, "arch", None) == arch and "Nano" in n
             and not getattr(f, "gated", False)]
    assert names, f"the registry has no Nano size of {arch}"
    return sorted(names)[0]


def _grid_png(folder: Path) -> Image.Image:
    grids = list((folder / "outputs" / "samples").glob("*.png"))
    assert len(grids) == 1, grids
    return Image.open(grids[0])


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_every_family_samples_from_its_file_with_no_other_flag(arch, tmp_path):
    name = _smallest_name(arch)
    torch.manual_seed(0)
    model = create_model(name, input_size=8, in_channels=3, num_classes=10)  # as train.py builds it on 8x8 digits
    process = create_process(type(unwrap(model)).default_process(model.config)).record()
    save_model(tmp_path / "model.pt", model, process=process, codec=PIXELS)
    proc = run_cli([str(ROOT / "sample.py"), "--ckpt", str(tmp_path / "model.pt")], cwd=tmp_path, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    grid = _grid_png(tmp_path)
    _, height, width = unwrap(model).data_shape
    # eight images (the first eight classes), nrow 4, enlarged to be visible, 2-pixel padding
    assert grid.size[0] > 4 * width and grid.size[1] > 2 * height
    if arch == "MAR":
        tokens = model.seq_len
        assert f"mar, 100 steps, num_iter {min(64, tokens)}," in proc.stdout  # the default fits the tokens
        proc = run_cli([str(ROOT / "sample.py"), "--ckpt", str(tmp_path / "model.pt"), "--num-iter", "64"],
                       cwd=tmp_path, check=False)
        one_line_error(proc, 2, f"--num-iter 64: the model has {tokens} tokens", f"at most {tokens}")


#################################################################################
#                         Grayscale pixel models end to end                     #
#################################################################################

@pytest.fixture(scope="module")
def gray(tmp_path_factory):
    """1-channel pixel features of a folder of 8x8 grayscale images (2 classes), and a 1-channel tiny DiT
    saved as a bare state dict in the official layout."""
    root = tmp_path_factory.mktemp("gray")
    rng = np.random.default_rng(0)
    for label in ("a", "b"):
        for i in range(8):
            path = root / "images" / label / f"{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8), mode="L").save(path)
    run_cli(["extract_features.py", "--data-path", str(root / "images"), "--features-path", str(root / "features"),
             "--vae", "none", "--channels", "1", "--image-size", "8", "--batch-size", "8"])
    model = tiny_dit(in_channels=1, num_classes=2, depth=2)
    torch.save(model.state_dict(), root / "bare.pt")
    return root


def _common(gray: Path, tmp_path: Path) -> list[str]:
    return ["--data-path", str(gray / "features"), "--results-dir", str(tmp_path), "--global-batch-size", "8",
            "--num-workers", "0", "--max-steps", "2"]


def test_grayscale_pixel_models_sample_after_training_and_learned_pruning(gray, tmp_path):
    bare = ["--load-weight", str(gray / "bare.pt"), "--model", "DiT", "--num-heads", "2"]
    run_cli(["train.py", *bare, *_common(gray, tmp_path), "--save-model", str(tmp_path / "tuned.pt")])
    run_cli(["prune_by_learning.py", *bare, "--groups", "1x1:2", *_common(gray, tmp_path),
             "--save-model", str(tmp_path / "pruned.pt")])
    for name in ("tuned", "pruned"):
        loaded = load_model(tmp_path / f"{name}.pt")
        assert loaded.codec == PIXELS, name  # the codec of the features it met
        out = tmp_path / f"{name}.png"
        run_cli(["sample.py", "--ckpt", str(tmp_path / f"{name}.pt"), "--num-sampling-steps", "2", "--out", str(out)])
        grid = np.asarray(Image.open(out).convert("RGB"))
        assert (grid[..., 0] == grid[..., 1]).all() and (grid[..., 1] == grid[..., 2]).all()  # gray
    # any 1-channel pixel model with --vae none, a bare state dict included; and with no --vae at all
    for vae in (["--vae", "none"], []):
        out = tmp_path / f"bare{len(vae)}.png"
        run_cli(["sample.py", "--ckpt", str(gray / "bare.pt"), "--model", "DiT", "--num-heads", "2", *vae,
                 "--num-sampling-steps", "2", "--out", str(out)])
        assert out.is_file()


def test_a_grayscale_sample_set_is_an_rgb_npz_of_equal_channels(gray, tmp_path):
    npz = tmp_path / "gray.npz"
    run_cli(["sample_ddp.py", "--ckpt", str(gray / "bare.pt"), "--model", "DiT", "--num-heads", "2",
             "--num-fid-samples", "4", "--per-proc-batch-size", "4", "--num-sampling-steps", "2",
             "--sample-dir", str(tmp_path / "samples"), "--npz", str(npz)])
    with np.load(npz) as data:
        images = data["arr_0"]
    assert images.shape == (4, 8, 8, 3) and images.dtype == np.uint8
    assert (images[..., 0] == images[..., 1]).all() and (images[..., 0] == images[..., 2]).all()


#################################################################################
#                            Bugs keep their traceback                          #
#################################################################################

def test_an_internal_error_keeps_its_traceback_and_says_it_is_a_bug(tmp_path):
    """A ValueError raised inside the library (not a UserError where an input is checked) is a bug."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        "import tinyfusion.sampling as sampling\n"
        "def broken(options):\n"
        "    raise ValueError('not enough values to unpack (expected 2, got 1)')\n"
        "sampling.run_sample = broken\n")
    proc = run_cli(["sample.py", "--ckpt", str(tmp_path / "any.pt")], check=False,
                   env={"PYTHONPATH": f"{ROOT}:{site}"})
    assert proc.returncode == 1
    assert "Traceback (most recent call last)" in proc.stderr and "in broken" in proc.stderr
    assert "ValueError: not enough values to unpack" in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("sample.py: internal error:") and "bug" in last
    # the same script's user error is still one line, exit 2
    proc = run_cli(["sample.py", "--ckpt", str(tmp_path / "missing.pt")], check=False)
    assert one_line_error(proc, 2, "missing.pt").startswith("sample.py: error:")


def test_a_dit_whose_file_records_the_transport_is_one_line(tmp_path):
    """A DiT's learn_sigma output (2C channels) cannot drive SiT's transport: a bad file, not a bug."""
    from processes.flow import TransportProcess

    model = create_model("DiT-Nano/2", input_size=8, in_channels=3, num_classes=10)
    save_model(tmp_path / "dit.pt", model, process=TransportProcess().record(), codec=PIXELS)
    proc = run_cli(["sample.py", "--ckpt", str(tmp_path / "dit.pt"), "--out", str(tmp_path / "x.png")], check=False)
    one_line_error(proc, 2, "learn_sigma DiT returns 2C channels")
    assert not (tmp_path / "x.png").exists()
