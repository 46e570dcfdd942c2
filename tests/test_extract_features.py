"""extract_features.py end to end (real torchrun, a tiny VAE), the image helpers, and both feature layouts."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import no_network_path, run_cli
from helpers.tolerance import assert_fp32_close
from PIL import Image

import extract_features
from tinyfusion.distributed import DistEnv
from tinyfusion.extraction import check_model_inputs, encode_seed
from tinyfusion.extraction import encode_image_folder as extract
from tinyfusion.features import REFERENCE_FEATURES, REFERENCE_LABELS, FeatureDataset, shard_names
from tinyfusion.images import adm_center_crop, image_to_tensor, list_image_folder, load_image
from tinyfusion.vae import load_codec

SIZE, SHARD, BATCH = 16, 4, 3  # 15 images: shards of 4, 4, 4, 3, each cut into batches of 3 and 1
CPU = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


@pytest.fixture(scope="module")
def tiny_vae(tmp_path_factory) -> Path:
    from diffusers.models import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=8, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
    path = tmp_path_factory.mktemp("vae")
    vae.save_pretrained(path)
    return path


def _make_folder(root: Path) -> Path:
    """3 classes x 5 images of odd sizes; one in a subfolder with an upper-case extension, plus a non-image."""
    rng = np.random.default_rng(0)
    sizes = [(40, 36), (37, 45), (50, 20), (33, 33), (64, 41)]
    for name in ("cat", "dog", "owl"):
        for i, (w, h) in enumerate(sizes):
            path = root / name / (f"sub/img{i}.PNG" if (name, i) == ("dog", 4) else f"img{i}.png")
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
    (root / "cat" / "notes.txt").write_text("not an image")
    return root


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    return _make_folder(tmp_path_factory.mktemp("data"))


def _args(data: Path, out: Path, vae: Path | str, *extra: str) -> list[str]:
    return ["--data-path", str(data), "--features-path", str(out), "--vae", str(vae), "--image-size", str(SIZE),
            "--shard-size", str(SHARD), "--batch-size", str(BATCH), *extra]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_vae, image_folder) -> dict:
    """The same extraction by 2 processes under torchrun (recording who did what), and by 1 (in this
    process, one thread like the CLI's: it saves a second start of torch and diffusers)."""
    tmp = tmp_path_factory.mktemp("runs")
    spy = tmp / "spy"
    spy.mkdir()
    two = run_cli(["tests/helpers/extract_spy.py", *_args(image_folder, tmp / "two", tiny_vae, "--num-workers", "1"),
                   "--model", "DiT-S/2"], nproc=2, env={"EXTRACT_SPY_DIR": str(spy)}, timeout=300)
    extract(list_image_folder(image_folder), tmp / "one", load_codec(str(tiny_vae)), CPU, image_size=SIZE,
            shard_size=SHARD, batch_size=BATCH, num_workers=0)
    events = {rank: [json.loads(line) for line in (spy / f"rank{rank}.jsonl").read_text().splitlines()]
              for rank in (0, 1)}
    return {"two": tmp / "two", "one": tmp / "one", "events": events, "two_log": two.stdout}


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _cropped(path: Path) -> torch.Tensor:
    return image_to_tensor(adm_center_crop(load_image(path), SIZE))


#################################################################################
#                                  End to end                                   #
#################################################################################

def test_two_processes_encode_every_image_once_and_match_one_process(runs, image_folder):
    events = runs["events"]
    for rank in (0, 1):
        assert sorted(e["shard"] for e in events[rank] if "shard" in e) == [k for k in range(4) if k % 2 == rank]
    encoded = [i for rank in (0, 1) for e in events[rank] if "encoded" in e for i in e["encoded"]]
    assert sorted(encoded) == list(range(15))
    listing = list_image_folder(image_folder)
    index = json.loads((runs["two"] / "index.json").read_text())
    assert index["num_images"] == 15 and index["copies"] == 2 and index["latent_shape"] == [4, SIZE // 2, SIZE // 2]
    assert index["class_names"] == ["cat", "dog", "owl"] and index["num_classes"] == 3
    assert [s["count"] for s in index["shards"]] == [4, 4, 4, 3]
    assert index["source"]["flip"] is True and index["source"]["image_size"] == SIZE
    assert index["source"]["scaling_factor"] == pytest.approx(0.18215) and index["source"]["skipped"] == []
    assert FeatureDataset(runs["two"]).labels().tolist() == listing.labels == [0] * 5 + [1] * 5 + [2] * 5
    assert _files(runs["two"]) == _files(runs["one"])  # byte-identical: shards, index, records
    assert "15 images of 3 classes in 4 shards of 4; 0 already done, 4 to encode on 2 process" in runs["two_log"]


def test_feature_dataset_reads_both_copies_and_the_mirror_is_the_mirrored_image(runs, tiny_vae, image_folder):
    dataset = FeatureDataset(runs["one"])
    assert len(dataset) == 15 and dataset.copies == 2 and dataset.num_classes == 3
    codec = load_codec(str(tiny_vae))
    listing = list_image_folder(image_folder)
    for i in (0, 9, 14):
        image = _cropped(image_folder / listing.paths[i])[None]
        for copy, view in ((0, image), (1, image.flip(-1))):
            latent, label = dataset[(i, copy)]
            expected = codec.encode(view, generator=[torch.Generator().manual_seed(encode_seed(0, i, copy))])[0]
            assert label.item() == listing.labels[i] and latent.shape == (4, SIZE // 2, SIZE // 2)
            assert_fp32_close(latent, expected)  # one image alone against its batch: kernel rounding only
        assert not torch.equal(dataset[(i, 0)][0], dataset[(i, 1)][0])
    drawn = dataset[3][0]  # an int key picks a copy at random
    assert any(torch.equal(drawn, dataset[(3, c)][0]) for c in (0, 1))


@pytest.fixture(scope="module")
def pixel_run(tmp_path_factory, image_folder) -> Path:
    """Pixel space (no VAE, so no diffusers import: a fast run), no mirrors."""
    out = tmp_path_factory.mktemp("pixels") / "features"
    run_cli(["extract_features.py", *_args(image_folder, out, "none", "--no-flip", "--num-workers", "0")])
    return out


def test_rerun_redoes_only_the_missing_shards(pixel_run, image_folder, tmp_path):
    out = tmp_path / "features"
    shutil.copytree(pixel_run, out)
    # An interruption: shard 1 lost its labels (killed between its two files), shard 3 never started.
    (out / shard_names(1)[1]).unlink()
    for name in shard_names(3):
        (out / name).unlink()
    (out / "index.json").unlink()
    kept = {name: (out / name).stat() for k in (0, 2) for name in shard_names(k)}
    run_cli(["extract_features.py", *_args(image_folder, out, "none", "--no-flip", "--num-workers", "0")])
    for name, before in kept.items():
        after = (out / name).stat()
        assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns), f"{name} was redone"
    assert (out / shard_names(1)[0]).stat().st_ino != (pixel_run / shard_names(1)[0]).stat().st_ino
    assert _files(out) == _files(pixel_run)


def test_pixel_space_without_flip_stores_the_cropped_images(pixel_run, image_folder):
    dataset = FeatureDataset(pixel_run)
    assert dataset.copies == 1 and dataset.latent_shape == (3, SIZE, SIZE)
    assert dataset.index.source["flip"] is False and dataset.index.source["vae"] == "none"
    listing = list_image_folder(image_folder)
    for i in range(15):
        pixels, label = dataset[(i, 0)]
        assert pixels.min() >= -1 and pixels.max() <= 1 and label.item() == listing.labels[i]
        torch.testing.assert_close(pixels, _cropped(image_folder / listing.paths[i]), rtol=0, atol=0)


def test_grayscale_pixel_features_have_one_channel(image_folder, tmp_path):
    out = tmp_path / "gray"
    run_cli(["extract_features.py", *_args(image_folder, out, "none", "--no-flip", "--num-workers", "0",
                                           "--channels", "1")])
    dataset = FeatureDataset(out)
    assert dataset.latent_shape == (1, SIZE, SIZE) and dataset.index.source["channels"] == 1
    listing = list_image_folder(image_folder)
    for i in (0, 7, 14):
        expected = image_to_tensor(adm_center_crop(load_image(image_folder / listing.paths[i], "L"), SIZE))
        torch.testing.assert_close(dataset[(i, 0)][0], expected, rtol=0, atol=0)
    # refused before the VAE is fetched: with no network and an empty cache, a download would fail loudly
    proc = run_cli(["extract_features.py", *_args(image_folder, tmp_path / "vae", "ema", "--channels", "1")],
                   check=False, env={"PYTHONPATH": no_network_path(tmp_path), "HF_HOME": str(tmp_path / "hf")})
    assert proc.returncode == 2 and "--channels 1 writes grayscale pixels" in proc.stderr
    assert "network access attempted" not in proc.stderr and not (tmp_path / "vae").exists()


def test_corrupt_image_stops_the_run_naming_it_and_skip_bad_leaves_it_out(image_folder, tmp_path):
    data = shutil.copytree(image_folder, tmp_path / "data")
    (data / "dog" / "img2b.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")  # index 8 of 16
    with pytest.raises(ValueError, match=r"cannot read image .*dog/img2b\.png.*pass --skip-bad"):
        extract(list_image_folder(data), tmp_path / "stop", load_codec("none"), CPU, image_size=SIZE, num_workers=0)

    out = tmp_path / "skip"
    proc = run_cli(["extract_features.py", *_args(data, out, "none", "--num-workers", "0", "--skip-bad")])
    assert "skipping image 8 (dog/img2b.png)" in proc.stdout and "skipped 1 unreadable" in proc.stdout
    skipped = json.loads((out / "skipped.json").read_text())
    assert [(s["index"], s["path"], s["label"]) for s in skipped] == [(8, "dog/img2b.png", 1)]
    dataset = FeatureDataset(out)
    assert dataset.index.source["skipped"] == ["dog/img2b.png"]
    # 16 files: shard 2 (images 8-11) holds one image fewer; every other image keeps its shard and label.
    assert [s["count"] for s in dataset.index.shards] == [4, 4, 3, 4] and len(dataset) == 15
    listing = list_image_folder(data)
    kept = [i for i in range(16) if i != 8]
    assert dataset.labels().tolist() == [listing.labels[i] for i in kept]
    for position, i in enumerate(kept):
        torch.testing.assert_close(dataset[(position, 0)][0], _cropped(data / listing.paths[i]), rtol=0, atol=0)


#################################################################################
#                                 Library pieces                                #
#################################################################################

def test_reference_layout_is_read_by_feature_dataset(tmp_path):
    (tmp_path / REFERENCE_FEATURES).mkdir()
    (tmp_path / REFERENCE_LABELS).mkdir()
    latents = np.random.default_rng(0).standard_normal((3, 2, 4, 8, 8)).astype(np.float32)
    for i in range(3):
        np.save(tmp_path / REFERENCE_FEATURES / f"{i:03d}.npy", latents[i])
        np.save(tmp_path / REFERENCE_LABELS / f"{i:03d}.npy", np.array([7 * i]))
    dataset = FeatureDataset(tmp_path)
    assert dataset.layout == "reference" and len(dataset) == 3 and dataset.copies == 2
    assert dataset.latent_shape == (4, 8, 8) and dataset.labels().tolist() == [0, 7, 14]
    latent, label = dataset[(2, 1)]
    assert label.item() == 14 and torch.equal(latent, torch.from_numpy(latents[2, 1]))


def test_adm_center_crop_keeps_the_middle_of_known_images():
    # 512x300, white square in the middle, red bands at the left and right edges that the crop removes:
    # the short side becomes 256 (437x256), and the middle 256 columns are x in [105.5, 405.5) of the original.
    pixels = np.zeros((300, 512, 3), dtype=np.uint8)
    pixels[:, :100] = pixels[:, 412:] = (255, 0, 0)
    pixels[100:200, 206:306] = 255
    crop = np.asarray(adm_center_crop(Image.fromarray(pixels), 256)).astype(int)
    assert crop.shape == (256, 256, 3)
    assert (crop[..., 0] - crop[..., 1] < 60).all(), "an edge band survived the crop"
    white = np.argwhere(crop.min(axis=-1) > 200)
    assert abs(white.mean(axis=0) - 127.5).max() < 1 and 80 <= len(np.unique(white[:, 0])) <= 90
    # Halving first (min side 600 >= 2 * 256), then bicubic; portrait and tiny images too.
    for size_in, size_out in (((1100, 600), 256), ((300, 512), 256), ((40, 36), 16), ((7, 9), 16)):
        assert adm_center_crop(Image.new("RGB", size_in), size_out).size == (size_out, size_out)
    gray = adm_center_crop(Image.new("RGB", (1100, 600), (128, 128, 128)), 256)
    assert set(np.unique(np.asarray(gray))) == {128}


def test_image_helpers_list_decode_and_normalise(image_folder, tmp_path):
    listing = list_image_folder(image_folder)
    assert listing.class_names == ["cat", "dog", "owl"] and len(listing) == 15
    assert listing.paths[9] == "dog/sub/img4.PNG" and listing.labels[9] == 1
    assert "cat/notes.txt" not in listing.paths
    tensor = image_to_tensor(Image.new("RGB", (2, 1), (255, 0, 128)))
    assert tensor.shape == (3, 1, 2)
    assert tensor[:, 0, 0].tolist() == pytest.approx([1.0, -1.0, 128 / 127.5 - 1], abs=1e-6)
    gray = tmp_path / "gray.png"
    Image.new("L", (5, 4), 10).save(gray)
    assert load_image(gray).mode == "RGB"
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes((image_folder / listing.paths[0]).read_bytes()[:80])
    for bad in (truncated, tmp_path / "missing.png"):
        with pytest.raises(ValueError, match=bad.name):
            load_image(bad)
    with pytest.raises(ValueError, match="is not a folder"):
        list_image_folder(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="no class subfolders"):
        list_image_folder(tmp_path)
    (tmp_path / "empty_class").mkdir()
    (tmp_path / "full_class").mkdir()
    Image.new("RGB", (4, 4)).save(tmp_path / "full_class" / "a.jpg")
    with pytest.raises(ValueError, match="empty_class"):
        list_image_folder(tmp_path)


def test_bad_settings_and_mixed_folders_are_refused(image_folder, tiny_vae, tmp_path):
    listing = list_image_folder(image_folder)
    pixels, vae = load_codec("none"), load_codec(str(tiny_vae))
    with pytest.raises(ValueError, match="--image-size 15 .* multiple of 2"):
        extract(listing, tmp_path / "odd", vae, CPU, image_size=15)
    with pytest.raises(ValueError, match="--batch-size must be at least 1"):
        extract(listing, tmp_path / "zero", pixels, CPU, image_size=SIZE, batch_size=0)
    out = tmp_path / "features"
    extract(listing, out, pixels, CPU, image_size=SIZE, shard_size=8, num_workers=0, flip=False)
    for changes, flag in (({"image_size": 8}, "--image-size"), ({"flip": True}, "--flip/--no-flip")):
        settings = {**dict(image_size=SIZE, shard_size=8, num_workers=0, flip=False), **changes}
        with pytest.raises(ValueError, match=f"{flag}.*use a new --features-path"):
            extract(listing, out, pixels, CPU, **settings)
    (out / "index.json").unlink()
    with pytest.raises(ValueError, match="--vae"):  # extraction.json alone guards an unfinished folder
        extract(listing, out, vae, CPU, image_size=SIZE, shard_size=8, num_workers=0, flip=False)
    (out / "extraction.json").unlink()
    with pytest.raises(ValueError, match="holds shards but no extraction.json"):
        extract(listing, out, pixels, CPU, image_size=SIZE, shard_size=8, num_workers=0, flip=False)


def test_model_check_names_what_to_change(tiny_vae):
    vae = load_codec(str(tiny_vae))
    check_model_inputs("DiT-S/2", vae, SIZE)
    check_model_inputs("DiT-XL-1-2", vae, SIZE)  # a gated preset checks as its base model
    with pytest.raises(ValueError, match="takes 4-channel inputs.*gives 3 channels.*in_channels=3"):
        check_model_inputs("DiT-XL/2", load_codec("none"), SIZE)
    with pytest.raises(ValueError, match="9x9 inputs.*multiple of 4"):
        check_model_inputs("DiT-S/2", vae, 18)
    with pytest.raises(ValueError, match="multiple of 16"):
        check_model_inputs("DiT-S/8", vae, 24)


def test_cli_is_strict_and_flip_is_a_switch():
    base = ["--data-path", "d", "--features-path", "f"]
    args = extract_features.parse_args(base)
    assert args.flip is True and args.vae == "ema" and args.image_size == 256 and args.precision == "fp32"
    assert extract_features.parse_args([*base, "--no-flip"]).flip is False
    for bad in (["--flip-images"], ["--image-size", "big"], ["--model", "DiT-Z/2"], ["--features"]):
        with pytest.raises(SystemExit):
            extract_features.parse_args([*base, *bad])
