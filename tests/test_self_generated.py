"""Self-generated data (issue 22): sample_ddp.py --save-latents DIR keeps the teacher's samples before decoding,
with their labels, as a feature set that training reads (--data-path DIR), through the real scripts."""

import hashlib
import json

import numpy as np
import pytest
import torch
from helpers import one_line_error, run_cli, tiny_dit

from processes import create_process
from tinyfusion.checkpoint import load_model, save_model
from tinyfusion.errors import UserError
from tinyfusion.features import FeatureDataset, write_index, write_shard
from tinyfusion.options import SampleSetOptions
from tinyfusion.sampling import (
    SamplingSpec,
    image_labels,
    image_seeds,
    load_for_sampling,
    run_sample_ddp,
    sample_latents,
    to_uint8,
)

# A pixel-space tiny DiT (3 channels, 8 x 8 images): its latents are pixels, and no VAE is needed.
N, BATCH, SEED, STEPS, CFG = 10, 4, 11, 5, 1.5
NAME = f"tiny-ddpm{STEPS}-cfg{CFG:g}-seed{SEED}-n{N}"


def _sample_ddp(root, run, nproc=1, check=True, seed=SEED, latents=None):
    return run_cli(["sample_ddp.py", "--ckpt", str(root / "tiny.pt"), "--num-sampling-steps", str(STEPS),
                    "--cfg-scale", str(CFG), "--device", "cpu", "--num-fid-samples", str(N),
                    "--per-proc-batch-size", str(BATCH), "--global-seed", str(seed), "--sample-dir", str(root / run),
                    "--save-latents", str(latents or root / run / "latents")], nproc=nproc, check=check)


def index_digest(folder):
    return hashlib.sha256((folder / "index.json").read_bytes()).hexdigest()


def _files(folder):
    """Every file under `folder`: relative path -> bytes."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same 10 samples (batches of 4: the last is ragged) with one process and with two. The checkpoint
    records no codec (its 3 input channels are read as pixels), so what training records comes from the data."""
    root = tmp_path_factory.mktemp("self_generated")
    save_model(root / "tiny.pt", tiny_dit(in_channels=3, depth=2))
    _sample_ddp(root, "one")
    _sample_ddp(root, "two", nproc=2)
    return root


def test_the_latents_read_back_as_a_feature_set_of_the_samples(runs):
    data = FeatureDataset(runs / "one" / "latents")
    assert (len(data), data.copies, data.latent_shape, data.num_classes) == (N, 1, (3, 8, 8), 10)
    index = data.index
    assert index.class_names == [str(k) for k in range(10)] and index.dtype == "float32"
    assert (index.source["vae"], index.source["scaling_factor"], index.source["flip"]) == ("none", 1.0, False)
    protocol = index.source["sampling_protocol"]
    record = json.loads((runs / "one" / f"{NAME}.json").read_text())
    assert protocol == {k: v for k, v in record.items() if k not in ("arrays", "npz", "npz_sha256", "latents",
                                                                      "latents_index_sha256", "checkpoint_path")}
    assert (protocol["checkpoint_sha256"], protocol["global_seed"]) == (record["checkpoint_sha256"], SEED)
    generation = json.loads((runs / "one" / "latents" / "generation.json").read_text())
    assert generation["checkpoint_path"] == str(runs / "tiny.pt") and generation["source"] == index.source
    assert (record["latents"], record["latents_index_sha256"]) == (str(runs / "one" / "latents"),
                                                                   index_digest(runs / "one" / "latents"))

    # The latents are sample_latents' for the run's seeds and labels, in the run's batches (as sample.py draws).
    loaded, codec = load_for_sampling(runs / "tiny.pt")
    process = create_process(loaded.process)
    spec = SamplingSpec.for_process(process, sampler=None, num_steps=STEPS, cfg_scale=CFG)
    stored = torch.stack([data[(i, 0)][0] for i in range(N)])  # (N, 3, 8, 8)
    expected = []
    for start in range(0, N, BATCH):
        indices = range(start, start + BATCH)
        labels = torch.tensor(image_labels(SEED, indices, 10))
        expected.append(sample_latents(loaded.model, process, labels, image_seeds(SEED, indices), spec))
    assert torch.equal(stored, torch.cat(expected)[:N])
    with np.load(runs / "one" / f"{NAME}.npz") as npz:
        np.testing.assert_array_equal(data.labels(), npz["arr_1"])
        np.testing.assert_array_equal(to_uint8(codec.decode(stored)), npz["arr_0"])  # the same images


def test_one_and_two_processes_write_the_same_bytes(runs):
    one, two = _files(runs / "one" / "latents"), _files(runs / "two" / "latents")
    shards = {f"shards/{kind}-0000{k}.npy" for kind in ("latents", "labels") for k in range(3)}
    assert set(one) == {"generation.json", "index.json", *shards}
    assert one == two


def test_a_run_resumes_only_the_missing_shards(runs):
    latents = runs / "one" / "latents"
    before = _files(latents)
    parts = {p: p.stat().st_mtime_ns for p in (runs / "one" / NAME).glob("part-*.npz")}
    (latents / "shards" / "latents-00001.npy").unlink()
    (latents / "shards" / ".labels-00002.npy.x1y2.tmp").write_bytes(b"cut")  # an interrupted write
    proc = _sample_ddp(runs, "one")
    assert "sampling 1 of 3 batches" in proc.stdout and "1 of 3 latent shards to write" in proc.stdout
    assert _files(latents) == before
    assert {p: p.stat().st_mtime_ns for p in parts} == parts  # the images were on disk: not written again


def test_training_takes_the_folder_as_data_path_and_records_its_codec(runs):
    out = runs / "train"
    run_cli(["train.py", "--load-weight", str(runs / "tiny.pt"), "--data-path", str(runs / "one" / "latents"),
             "--results-dir", str(out), "--global-batch-size", "4", "--num-workers", "0", "--max-steps", "2",
             "--log-every", "1", "--device", "cpu", "--save-model", str(out / "student.pt")])
    assert load_model(runs / "tiny.pt").codec is None
    assert load_model(out / "student.pt").codec == {"vae": "none", "scaling_factor": 1.0}


def test_a_folder_of_another_protocol_is_refused_in_one_line(runs):
    latents = runs / "one" / "latents"
    before = _files(latents)
    proc = _sample_ddp(runs, "other", seed=12, latents=latents, check=False)
    line = one_line_error(proc, 2, "--save-latents", "another protocol", "global_seed: 11 recorded, 12 now",
                          "use another --save-latents folder")
    assert str(latents) in line
    assert _files(latents) == before
    assert not (runs / "other" / f"tiny-ddpm{STEPS}-cfg{CFG:g}-seed12-n{N}" / "protocol.json").exists()


def test_bad_latents_folders_are_refused(runs, tmp_path):
    def options(latents):
        return SampleSetOptions(ckpt=str(runs / "tiny.pt"), num_sampling_steps=STEPS, device="cpu", num_fid_samples=N,
                                per_proc_batch_size=BATCH, sample_dir=str(tmp_path / "samples"),
                                save_latents=str(latents), tf32=False)

    with pytest.raises(UserError, match="--save-latents .* is the same folder as --ckpt .* choose another"):
        run_sample_ddp(options(runs / "tiny.pt"))
    with pytest.raises(UserError, match="--sample-dir and --save-latents are the same path"):
        run_sample_ddp(options(tmp_path / "samples"))
    extracted = tmp_path / "extracted"  # features of images, as extract_features.py writes them
    write_shard(extracted, 0, np.zeros((2, 1, 3, 8, 8), np.float32), np.zeros(2, np.int64))
    write_index(extracted, 1, num_classes=10, class_names=[str(k) for k in range(10)], source={"vae": "none"})
    with pytest.raises(UserError, match="holds features extracted from images .* use another --save-latents folder"):
        run_sample_ddp(options(extracted))
    (extracted / "index.json").unlink()
    with pytest.raises(UserError, match="holds shards but no generation.json"):
        run_sample_ddp(options(extracted))
