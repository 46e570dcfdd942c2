"""evaluator.py and tinyfusion.evaluation: inputs, feature extractors, and runs through the real CLI.

The InceptionV3 here has random weights made by the test (never downloaded): it proves the
wiring, not the numbers, which test_metrics.py checks on sets with known answers.
"""

import json
import math

import numpy as np
import pytest
import torch
from helpers import run_cli
from helpers.eval_inception import random_inception_state_dict
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from tinyfusion.evaluation import (
    INCEPTION_FILENAME,
    INCEPTION_URL,
    METRICS,
    ArrayImages,
    SmallClassifier,
    classifier_accuracy,
    default_inception_path,
    embed_images,
    evaluate,
    fid_statistics,
    load_feature_extractor,
    load_inception,
    match_channels,
    open_images,
    precision_recall,
    resolve_inception_weights,
    save_feature_extractor,
    split_halves,
    train_classifier,
)


def random_images(n, size=16, seed=0, channels=3):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, channels), dtype=np.uint8)


def write_folder(folder, images):
    folder.mkdir(parents=True)
    for i, image in enumerate(images):
        Image.fromarray(image.squeeze(-1) if image.shape[-1] == 1 else image).save(folder / f"{i:03d}.png")
    return folder


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The networks here are tiny: one thread is faster than several contending for shared cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def inception_weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("inception") / INCEPTION_FILENAME
    torch.save(random_inception_state_dict(seed=0), path)
    return path


#################################################################################
#                                    Inputs                                     #
#################################################################################

@pytest.mark.parametrize("save", [np.savez, np.savez_compressed])
def test_npz_images_are_streamed_in_batches(tmp_path, save):
    images = random_images(7, size=5)
    save(tmp_path / "batch.npz", arr_0=images)
    source = open_images(tmp_path / "batch.npz")
    batches = list(source.batches(3))
    assert (len(source), source.image_shape, source.stats) == (7, (5, 5, 3), {})
    assert [len(b) for b in batches] == [3, 3, 1]
    np.testing.assert_array_equal(np.concatenate(batches), images)


def test_npz_column_major_images_are_read(tmp_path):
    images = random_images(4, size=3)
    np.savez(tmp_path / "fortran.npz", arr_0=np.asfortranarray(images))
    np.testing.assert_array_equal(np.concatenate(list(open_images(tmp_path / "fortran.npz").batches(3))), images)


def test_npz_statistics_are_read_beside_the_images(tmp_path):
    mu, sigma = np.arange(3.0), np.eye(3) * 2
    np.savez(tmp_path / "ref.npz", arr_0=random_images(4), mu=mu, sigma=sigma, mu_s=mu[:2], sigma_s=np.eye(2))
    source = open_images(tmp_path / "ref.npz")
    assert len(source) == 4 and set(source.stats) == {"pool", "spatial"}
    np.testing.assert_array_equal(source.stats["pool"].sigma, sigma)
    np.savez(tmp_path / "stats.npz", mu=mu, sigma=sigma)
    assert len(open_images(tmp_path / "stats.npz")) == 0


@pytest.mark.parametrize("content, message", [
    (dict(arr_0=random_images(2).astype(np.float32)), r"expected arr_0: uint8 images of shape N x H x W x 3.*"
                                                      r"got dtype float32 and shape \(2, 16, 16, 3\)"),
    (dict(arr_0=random_images(2).transpose(0, 3, 1, 2)), r"got dtype uint8 and shape \(2, 3, 16, 16\).*NCHW"),
    (dict(arr_0=random_images(2)[0]), r"shape \(16, 16, 3\)"),
    (dict(images=random_images(2)), r"has no arr_0 \(its keys: \['images'\]\); expected arr_0: uint8"),
    (dict(arr_0=random_images(2), mu=np.zeros(3)), "has mu but no sigma"),
    (dict(mu=np.zeros(3), sigma=np.eye(4)), r"mu must be a float vector \(D,\) and sigma a float \(D, D\)"),
])
def test_malformed_npz_is_explained(tmp_path, content, message):
    np.savez(tmp_path / "bad.npz", **content)
    with pytest.raises(ValueError, match=message):
        open_images(tmp_path / "bad.npz")


def test_unreadable_inputs_are_explained(tmp_path):
    (tmp_path / "text.npz").write_text("not a zip")
    with pytest.raises(ValueError, match="not an .npz file"):
        open_images(tmp_path / "text.npz")
    with pytest.raises(ValueError, match="does not exist"):
        open_images(tmp_path / "missing.npz")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"holds no \.jpg, \.jpeg, \.png, .*\.webp images"):
        open_images(tmp_path / "empty")


def test_image_folders_are_read_as_rgb_in_path_order(tmp_path):
    rgb, gray = random_images(3, size=6), random_images(2, size=6, seed=1, channels=1)
    write_folder(tmp_path / "set", rgb)
    write_folder(tmp_path / "set" / "zz_gray", gray)
    source = open_images(tmp_path / "set")
    read = np.concatenate(list(source.batches(2)))
    assert len(source) == 5 and source.image_shape == (6, 6, 3)
    np.testing.assert_array_equal(read[:3], rgb)
    np.testing.assert_array_equal(read[3:], np.repeat(gray, 3, axis=-1))
    Image.fromarray(random_images(1, size=7)[0]).save(tmp_path / "set" / "zzz.png")
    with pytest.raises(ValueError, match="must all have one size"):
        list(open_images(tmp_path / "set").batches(8))


def test_the_evaluator_reads_every_extension_that_extraction_reads(tmp_path):
    from tinyfusion.images import IMAGE_EXTENSIONS

    images = random_images(3, size=6)
    for image, ext in zip(images, (".webp", ".bmp", ".tiff")):  # lossless formats: the pixels come back exactly
        assert ext in IMAGE_EXTENSIONS
        save = {"lossless": True} if ext == ".webp" else {}
        Image.fromarray(image).save(tmp_path / f"{len(list(tmp_path.iterdir()))}{ext}", **save)
    np.testing.assert_array_equal(np.concatenate(list(open_images(tmp_path).batches(8))), images)


def test_split_halves_are_disjoint_random_and_reproducible():
    images = np.arange(11)
    a, b = split_halves(images, seed=3)
    assert len(a) == len(b) == 5 and not set(a) & set(b)
    assert sorted(a) != list(range(5))
    np.testing.assert_array_equal(split_halves(images, seed=3)[0], a)


def test_match_channels_repeats_gray_and_takes_the_luma_of_rgb():
    rgb = random_images(2, size=5)
    x = torch.from_numpy(rgb).permute(0, 3, 1, 2)
    gray = match_channels(x, 1)
    pil = np.stack([np.asarray(Image.fromarray(image).convert("L")) for image in rgb])
    assert np.abs(gray[:, 0].numpy().astype(int) - pil).max() <= 1
    torch.testing.assert_close(match_channels(gray, 3), gray.expand(-1, 3, -1, -1))


#################################################################################
#                          InceptionV3 (random weights)                         #
#################################################################################

def test_inception_features_are_adm_pool_unbiased_logits_and_mixed_6_conv(inception_weights):
    inception = load_inception(inception_weights)
    captured = {}
    inception.net.Mixed_6d.branch1x1.register_forward_hook(lambda m, i, out: captured.update(out=out.clone()))
    images = torch.from_numpy(random_images(1, size=16)).permute(0, 3, 1, 2)
    features = inception.features(images)
    assert {k: tuple(v.shape) for k, v in features.items()} == {"pool": (1, 2048), "logits": (1, 1008),
                                                                  "spatial": (1, 2023)}
    # mixed_6/conv is 17 x 17 x 192 in TF; ADM keeps channels [:7], flattened in (H, W, C) order.
    assert captured["out"].shape == (1, 192, 17, 17)
    torch.testing.assert_close(features["spatial"], captured["out"][:, :7].permute(0, 2, 3, 1).reshape(1, -1))
    torch.testing.assert_close(features["logits"], features["pool"] @ inception.net.fc.weight.T)
    assert features["pool"].abs().sum() > 0 and torch.isfinite(features["logits"]).all()


def test_inception_weights_that_do_not_fit_are_refused(tmp_path):
    torch.save(SmallClassifier(8, 10).state_dict(), tmp_path / "wrong.pth")
    with pytest.raises(ValueError, match="do not fit torch-fidelity's InceptionV3"):
        load_inception(tmp_path / "wrong.pth")


def test_missing_inception_weights_say_where_to_put_them(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    cached = tmp_path / "torch" / "hub" / "checkpoints" / INCEPTION_FILENAME
    assert default_inception_path() == cached
    for path in (None, tmp_path / "missing.pth"):
        with pytest.raises(ValueError) as error:
            resolve_inception_weights(path, download=False)
        assert INCEPTION_URL in str(error.value) and str(cached) in str(error.value)
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"")
    assert resolve_inception_weights(None, download=False) == cached


def test_cli_inception_end_to_end(tmp_path, inception_weights):
    images = random_images(6, size=32)
    np.savez(tmp_path / "ref.npz", arr_0=images)
    folder = write_folder(tmp_path / "samples", images)
    out = tmp_path / "results.json"
    # --fid-method eigvals: scipy's sqrtm of two 2048-dim matrices would take a minute here; both
    # methods are checked against each other and against closed forms in test_metrics.py.
    proc = run_cli(["evaluator.py", str(tmp_path / "ref.npz"), str(folder), "--inception-weights",
                    str(inception_weights), "--out", str(out), "--device", "cpu", "--batch-size", "4",
                    "--fid-method", "eigvals"], timeout=300)
    results = json.loads(out.read_text())
    metrics = results["metrics"]
    assert results["feature_space"] == "inception-v3"
    assert (results["num_reference_images"], results["num_sample_images"]) == (6, 6)
    assert results["reference_statistics"] == {"pool": "computed", "spatial": "computed"}
    assert set(metrics) == set(METRICS) and all(math.isfinite(v) for v in metrics.values())
    # The same images on both sides (PNG is lossless): FID and sFID vanish, every ball covers.
    assert abs(metrics["fid"]) < 1e-3 and abs(metrics["sfid"]) < 1e-3
    assert metrics["precision"] == metrics["recall"] == 1.0
    assert metrics["inception_score"] >= 1.0
    assert "FID " in proc.stdout and "sFID" in proc.stdout and "feature space" not in proc.stdout


#################################################################################
#                     Precomputed statistics (a stand-in network)               #
#################################################################################

class PixelFeatures(torch.nn.Module):
    """A stand-in for Inception: features are pixels, and ADM's statistics are said to describe them."""

    name = "pixels"
    adm_statistics = True

    def features(self, images):
        x = images.flatten(1).float() / 255
        return {"pool": x[:, :5], "logits": 4 * x[:, 5:8], "spatial": x[:, 8:11]}


def test_reference_statistics_are_used_instead_of_its_images(tmp_path):
    sample, ref_images = random_images(8, size=4, seed=1), random_images(10, size=4, seed=2)
    extractor = PixelFeatures()
    features = embed_images(ArrayImages(sample), extractor, progress=False)
    pool, spatial = fid_statistics(features["pool"]), fid_statistics(features["spatial"])
    np.savez(tmp_path / "ref.npz", arr_0=ref_images, mu=pool.mu, sigma=pool.sigma, mu_s=spatial.mu,
             sigma_s=spatial.sigma)
    notes = []
    results = evaluate(tmp_path / "ref.npz", sample, extractor, progress=False, log=notes.append)
    # The statistics are the sample's own: FID 0 although the reference images differ.
    assert abs(results["metrics"]["fid"]) < 1e-6 and abs(results["metrics"]["sfid"]) < 1e-6
    assert results["reference_statistics"] == {"pool": "precomputed", "spatial": "precomputed"}
    assert notes == results["notes"] and "precomputed statistics" in notes[0]
    ref_pool = embed_images(ArrayImages(ref_images), extractor, progress=False)["pool"]
    assert (results["metrics"]["precision"], results["metrics"]["recall"]) == precision_recall(ref_pool,
                                                                                               features["pool"])
    ignored = evaluate(tmp_path / "ref.npz", sample, extractor, use_ref_stats=False, progress=False)
    assert ignored["metrics"]["fid"] == pytest.approx(fid_statistics(ref_pool).frechet_distance(pool), rel=1e-9)
    assert ignored["metrics"]["fid"] > 0.01


def test_reference_without_images_skips_precision_recall(tmp_path):
    sample = random_images(8, size=4, seed=1)
    extractor = PixelFeatures()
    np.savez(tmp_path / "stats.npz", mu=np.full(5, 0.5), sigma=np.eye(5) / 12)
    results = evaluate(tmp_path / "stats.npz", sample, extractor, progress=False)
    metrics = results["metrics"]
    assert math.isfinite(metrics["fid"]) and math.isfinite(metrics["inception_score"])
    assert metrics["sfid"] is None and metrics["precision"] is None and metrics["recall"] is None
    assert any("Precision and Recall skipped: they need the reference images" in n for n in results["notes"])
    assert any("sFID skipped" in n for n in results["notes"])
    assert results["num_reference_images"] == 0

    np.savez(tmp_path / "wrong_dim.npz", mu=np.zeros(4), sigma=np.eye(4))
    with pytest.raises(ValueError, match="have 4 dimensions, but the pixels pool features have 5"):
        evaluate(tmp_path / "wrong_dim.npz", sample, extractor, progress=False)
    extractor.adm_statistics = False
    with pytest.raises(ValueError, match="holds no images"):
        evaluate(tmp_path / "stats.npz", sample, extractor, progress=False)


#################################################################################
#                         A feature extractor of one's own                      #
#################################################################################

@pytest.fixture(scope="module")
def digits():
    data = load_digits()
    images = np.round(data.images * 255 / 16).astype(np.uint8)[..., None].repeat(3, axis=-1)  # (1797, 8, 8, 3)
    x_train, x_test, y_train, y_test = train_test_split(images, data.target, test_size=0.2, random_state=0,
                                                        stratify=data.target)
    model = train_classifier(x_train, y_train, epochs=5, seed=0)
    return dict(model=model, x_train=x_train, x_test=x_test, y_test=y_test)


def test_train_classifier_learns_digits_in_five_epochs(digits):
    accuracy = classifier_accuracy(digits["model"], digits["x_test"], digits["y_test"])
    assert accuracy > 0.95, accuracy


# The border pixels of 8 x 8 digits are always blank: some spatial features are constant, and their
# covariance singular, which scipy's sqrtm warns about.
@pytest.mark.filterwarnings("ignore:Matrix is singular")
def test_classifier_feature_space_separates_real_from_noise(digits):
    real_a, real_b = split_halves(digits["x_train"], seed=0)
    noise = random_images(len(real_b), size=8, seed=4)
    floor = evaluate(real_a, real_b, digits["model"], progress=False)["metrics"]
    noisy = evaluate(real_a, noise, digits["model"], progress=False)["metrics"]
    assert floor["fid"] * 10 < noisy["fid"] and floor["sfid"] * 2 < noisy["sfid"]
    assert floor["precision"] > 0.5 > noisy["precision"] and floor["recall"] > 0.5 > noisy["recall"]
    # Real digits are spread over the 10 classes with confident predictions; noise is not.
    assert floor["inception_score"] > 5 > noisy["inception_score"]


def test_feature_extractor_file_round_trip(tmp_path):
    model = SmallClassifier(image_size=12, num_classes=4, in_channels=1, width=4, spatial_channels=2)
    save_feature_extractor(tmp_path / "fx.pt", model, name="toy-space", extra={"test_accuracy": 0.5})
    record = torch.load(tmp_path / "fx.pt", weights_only=True)
    assert (record["arch"], record["name"], record["config"]["image_size"]) == ("SmallClassifier", "toy-space", 12)
    loaded = load_feature_extractor(tmp_path / "fx.pt")
    assert loaded.name == "toy-space" and loaded.extra == {"test_accuracy": 0.5}
    images = torch.from_numpy(random_images(3, size=12)).permute(0, 3, 1, 2)  # RGB into a grayscale network
    expected, got = model.eval().features(images), loaded.features(images)
    # 12 x 12 -> one stride-2 conv -> 6 x 6 grid; spatial: 2 channels of it.
    assert {k: tuple(v.shape) for k, v in got.items()} == {"pool": (3, 16), "logits": (3, 4), "spatial": (3, 72)}
    for kind in expected:
        torch.testing.assert_close(got[kind], expected[kind])
    torch.save(model.state_dict(), tmp_path / "plain.pt")
    with pytest.raises(ValueError, match="not a feature-extractor file"):
        load_feature_extractor(tmp_path / "plain.pt")
    with pytest.raises(ValueError, match="does not exist; write one with"):
        load_feature_extractor(tmp_path / "missing.pt")


def test_cli_with_a_feature_extractor_of_ones_own(tmp_path):
    torch.manual_seed(0)
    model = SmallClassifier(image_size=8, num_classes=10, width=8)
    save_feature_extractor(tmp_path / "digits.pt", model, name="digits-classifier")
    ref, sample = random_images(24, size=8, seed=5), random_images(20, size=8, seed=6)
    # Inception statistics beside the images must not be used in another feature space.
    np.savez(tmp_path / "ref.npz", arr_0=ref, mu=np.zeros(2048), sigma=np.eye(2048, dtype=np.float32))
    np.savez(tmp_path / "sample.npz", arr_0=sample)
    out = tmp_path / "results.json"
    np.savez(tmp_path / "sample2.npz", arr_0=random_images(16, size=8, seed=7))
    proc = run_cli(["evaluator.py", str(tmp_path / "ref.npz"), str(tmp_path / "sample.npz"),
                    str(tmp_path / "sample2.npz"), "--feature-extractor", str(tmp_path / "digits.pt"), "--out",
                    str(out), "--device", "cpu"], timeout=300)
    results, second = json.loads(out.read_text())["results"]  # several sample sets, one reference
    assert second["num_sample_images"] == 16 and second["metrics"]["fid"] != results["metrics"]["fid"]
    assert results["feature_space"] == "digits-classifier"
    assert results["reference_statistics"] == {"pool": "computed", "spatial": "computed"}
    assert "they are not used" in proc.stdout and "FID (feature space: digits-classifier)" in proc.stdout
    expected = evaluate(ref, sample, load_feature_extractor(tmp_path / "digits.pt"), progress=False)["metrics"]
    assert results["metrics"] == pytest.approx(expected, rel=1e-6)
    assert all(math.isfinite(v) for v in results["metrics"].values())


def test_cli_explains_a_malformed_npz(tmp_path):
    np.savez(tmp_path / "ref.npz", arr_0=random_images(4))
    np.savez(tmp_path / "sample.npz", arr_0=random_images(4).astype(np.float32) / 255)
    save_feature_extractor(tmp_path / "fx.pt", SmallClassifier(16, 3, width=4))
    proc = run_cli(["evaluator.py", str(tmp_path / "ref.npz"), str(tmp_path / "sample.npz"), "--feature-extractor",
                    str(tmp_path / "fx.pt")], check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert "sample.npz: arr_0: expected arr_0: uint8 images of shape N x H x W x 3" in proc.stderr
    assert "got dtype float32" in proc.stderr
