"""What the toolkit's files record, and what loading makes of it: the weight set of a .safetensors file, the format
version, MAR's config (no runtime switches; the sampler's steps in the process record alone), the teacher of
Masked KD (its own head count, the keys its family says must agree), and the shared end of the training scripts."""

import json

import pytest
import torch
from helpers import tiny_dit, tiny_mar, write_features

from models import MAR, DiT, prune_depth
from processes import create_process
from tinyfusion.checkpoint import (
    FORMAT_VERSION,
    SAFETENSORS_METADATA_KEY,
    LoadedModel,
    atomic_save,
    load_model,
    model_record,
    read_checkpoint,
    save_model,
    with_integrity,
)
from tinyfusion.errors import UserError
from tinyfusion.sampling import SamplingSpec, sample_latents

CPU = torch.device("cpu")


def _same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)


#################################################################################
#                     The weight set of a .safetensors file                     #
#################################################################################

def test_a_safetensors_file_says_which_weights_it_holds(tmp_path):
    from tinyfusion.sampling import load_for_sampling, sampling_protocol

    model, ema = tiny_dit(seed=0, in_channels=3), tiny_dit(seed=1, in_channels=3)
    path = tmp_path / "m.safetensors"
    save_model(path, model, ema=ema, codec={"vae": "none", "scaling_factor": 1.0})
    loaded = load_model(path)
    assert loaded.weights == "ema"
    _same_weights(loaded.model, ema)
    with pytest.raises(UserError, match=r"m\.safetensors holds only the EMA weights.*--weights ema") as e:
        load_model(path, weights="model")
    assert "\n" not in str(e.value)
    # the sampling protocol reports the truth too
    loaded, codec = load_for_sampling(path, vae="none")
    spec = SamplingSpec.for_process(create_process(loaded.process), sampler="ddpm", num_steps=2, cfg_scale=1.0)
    protocol = sampling_protocol(loaded, codec, spec, seed=0, num_samples=1, batch_size=1, device=CPU, tf32=False)
    assert protocol["weights"] == "ema"

    # a model saved without an EMA holds the model's weights, and says so (weights="ema" prefers, as for .pt files)
    save_model(tmp_path / "raw.safetensors", model)
    for weights in ("ema", "model"):
        loaded = load_model(tmp_path / "raw.safetensors", weights=weights)
        assert loaded.weights == "model"
        _same_weights(loaded.model, model)


def test_a_safetensors_file_written_before_the_set_was_recorded_still_loads(tmp_path):
    from safetensors.torch import save

    model = tiny_dit()
    record = model_record(model)
    weights = record.pop("model")
    metadata = with_integrity({**record, "model": weights})
    metadata.pop("model")
    (tmp_path / "old.safetensors").write_bytes(
        save(weights, metadata={SAFETENSORS_METADATA_KEY: json.dumps(metadata)}))
    loaded = load_model(tmp_path / "old.safetensors")
    assert loaded.weights == "model"
    _same_weights(loaded.model, model)


#################################################################################
#                                The format version                             #
#################################################################################

@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_a_file_of_a_newer_format_version_is_refused(tmp_path, suffix):
    from safetensors.torch import save

    record = model_record(tiny_dit())
    record["version"] = FORMAT_VERSION + 1
    path = tmp_path / f"new{suffix}"
    if suffix == ".pt":
        atomic_save(record, path)
    else:
        weights = record.pop("model")
        metadata = with_integrity({**record, "weights": "model", "model": weights})
        metadata.pop("model")
        path.write_bytes(save(weights, metadata={SAFETENSORS_METADATA_KEY: json.dumps(metadata)}))
    for read in (read_checkpoint, load_model):
        with pytest.raises(UserError) as e:
            read(path)
        message = str(e.value)
        assert "\n" not in message and f"version {FORMAT_VERSION + 1}" in message
        assert f"up to {FORMAT_VERSION}" in message and "upgrade the toolkit" in message


def test_files_of_version_1_and_of_this_version_load(tmp_path):
    model = tiny_dit()
    save_model(tmp_path / "now.pt", model)
    assert read_checkpoint(tmp_path / "now.pt")["version"] == FORMAT_VERSION
    _same_weights(load_model(tmp_path / "now.pt").model, model)
    # version 1: no process, no codec, a config without per-block widths
    record = model_record(model)
    del record["process"], record["codec"]
    record["version"] = 1
    record["config"] = {k: v for k, v in record["config"].items() if k not in ("block_widths", "attention")}
    atomic_save(record, tmp_path / "v1.pt")
    loaded = load_model(tmp_path / "v1.pt")
    assert loaded.config == model.config and loaded.process["name"] == "gaussian" and loaded.codec is None
    _same_weights(loaded.model, model)


#################################################################################
#                                   MAR's config                                #
#################################################################################

def test_mar_config_holds_no_runtime_switch_nor_the_samplers_steps():
    model = tiny_mar()
    assert "grad_checkpointing" not in model.config and "num_sampling_steps" not in model.config
    before = dict(model.config)
    model.gradient_checkpointing = True
    assert model.gradient_checkpointing and model.diffloss.net.grad_checkpointing
    assert model.config == before  # the switch is not part of the config: nothing to go stale
    assert MAR(**model.config).config == model.config  # the config rebuilds the model
    assert MAR.default_process(model.config)["num_sampling_steps"] == 100  # the official default


def _sample(model, process_record, num_iter=2):
    process = create_process(process_record)
    spec = SamplingSpec.for_process(process, sampler=None, num_steps=None, options={"num_iter": num_iter},
                                    cfg_scale=1.5)
    return spec.num_steps, sample_latents(model, process, torch.tensor([1, 4]), [3, 4], spec)


def test_a_mar_round_trip_keeps_its_sampling(tmp_path):
    model = tiny_mar().eval()  # its own loop: 4 steps
    record = {**MAR.default_process(model.config), "num_sampling_steps": int(model.num_sampling_steps)}
    steps, before = _sample(model, record)
    save_model(tmp_path / "m.pt", model, process=record)
    saved = read_checkpoint(tmp_path / "m.pt")
    assert "num_sampling_steps" not in saved["config"] and saved["process"]["num_sampling_steps"] == 4  # one source
    loaded = load_model(tmp_path / "m.pt")
    assert loaded.config == model.config and loaded.process == create_process(record).record()
    assert loaded.model.num_sampling_steps == "4"  # the model's own loop follows the record
    after_steps, after = _sample(loaded.model, loaded.process)
    assert after_steps == steps == 4
    torch.testing.assert_close(after, before, atol=0, rtol=0)
    generators = [torch.Generator().manual_seed(s) for s in (3, 4)]
    direct = loaded.model.sample_tokens(2, num_iter=2, cfg=1.5, labels=torch.tensor([1, 4]), generators=generators)
    torch.testing.assert_close(direct, before, atol=0, rtol=0)


def test_an_older_mar_file_whose_config_carries_them_still_loads(tmp_path):
    model = tiny_mar().eval()
    record = model_record(model, process={**MAR.default_process(model.config), "num_sampling_steps": 4})
    record["config"] = {**record["config"], "num_sampling_steps": "4", "grad_checkpointing": False}
    atomic_save(record, tmp_path / "old.pt")
    loaded = load_model(tmp_path / "old.pt")
    assert loaded.config == model.config and loaded.process["num_sampling_steps"] == 4
    assert loaded.model.num_sampling_steps == "4"
    _same_weights(loaded.model, model)
    # a file of version 1 records no process: the steps its config carries make the process's
    del record["process"], record["codec"]
    record["version"] = 1
    atomic_save(record, tmp_path / "v1.pt")
    loaded = load_model(tmp_path / "v1.pt")
    assert loaded.process["num_sampling_steps"] == 4 and loaded.model.num_sampling_steps == "4"
    assert "num_sampling_steps" not in loaded.config


#################################################################################
#                            The teacher of Masked KD                           #
#################################################################################

def _loaded(model) -> LoadedModel:
    return LoadedModel(model=model, arch=model.arch, config=dict(model.config),
                       process=create_process(type(model).default_process(model.config)).record(), codec=None,
                       lineage=None, weights="model", path="", extra={})


def test_the_teacher_is_checked_on_the_keys_its_family_names():
    from tinyfusion.kd import check_teacher_fits

    check_teacher_fits(_loaded(prune_depth(tiny_dit(), [0, 2])), _loaded(tiny_dit()), "t.pt")  # depth may differ
    with pytest.raises(UserError, match="t.pt cannot teach this student: hidden_size 32 vs 64"):
        check_teacher_fits(_loaded(tiny_dit()), _loaded(tiny_dit(hidden_size=64, num_heads=4)), "t.pt")
    with pytest.raises(UserError, match="diffloss_w 32 vs 64"):
        check_teacher_fits(_loaded(tiny_mar()), _loaded(tiny_mar(diffloss_w=64)), "t.pt")

    # the keys come from the family: a family that names class_dropout_prob has it checked
    class Strict(DiT):
        teacher_compatible_keys = ("class_dropout_prob",)

    check_teacher_fits(_loaded(tiny_dit()), _loaded(tiny_dit(class_dropout_prob=0.2)), "t.pt")  # DiT: not a key
    with pytest.raises(UserError, match="class_dropout_prob 0.1 vs 0.2"):
        check_teacher_fits(_loaded(Strict(**tiny_dit().config)),
                           _loaded(Strict(**{**tiny_dit().config, "class_dropout_prob": 0.2})), "t.pt")

    # a family that declares none: every key of its config but its stacks' depths and widths
    class Undeclared(DiT):
        teacher_compatible_keys = None

    check_teacher_fits(_loaded(prune_depth(Undeclared(**tiny_dit().config), [1, 2])),
                       _loaded(Undeclared(**tiny_dit().config)), "t.pt")
    with pytest.raises(UserError, match="class_dropout_prob 0.1 vs 0.2"):
        check_teacher_fits(_loaded(Undeclared(**tiny_dit().config)),
                           _loaded(Undeclared(**{**tiny_dit().config, "class_dropout_prob": 0.2})), "t.pt")


@pytest.fixture
def features(tmp_path):
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(32, 1, 4, 8, 8, generator=g).numpy()
    labels = torch.randint(0, 10, (32,), generator=g).numpy()
    return write_features(tmp_path / "features", latents, labels, 10)


def _options(cls, tmp_path, features, **kwargs):
    return cls(data_path=str(features), results_dir=str(tmp_path / "runs"), device="cpu", precision="fp32",
               num_workers=0, global_batch_size=8, max_steps=2, log_every=1, ckpt_every=1000, **kwargs)


def test_the_teacher_loads_with_its_own_head_count_and_both_scripts_end_alike(tmp_path, features, monkeypatch):
    """A bare student (4 heads) and a bare teacher (2 heads) of a non-official width: --num-heads is the student's,
    --teacher-num-heads the teacher's. train.py and train_masked_kd.py then save through one function."""
    import tinyfusion.kd as kd
    from tinyfusion.args import to_options
    from tinyfusion.options import MaskedKDOptions, TrainOptions
    from tinyfusion.training import run_train
    from train_masked_kd import parse_args

    teacher, student = tiny_dit(seed=0), prune_depth(tiny_dit(seed=1, num_heads=4), [0, 3])
    torch.save(teacher.state_dict(), tmp_path / "teacher.pt")
    torch.save(student.state_dict(), tmp_path / "student.pt")
    parsed = to_options(MaskedKDOptions, parse_args(["--load-teacher", "t.pt", "--teacher-num-heads", "2",
                                                     "--data-path", "d", "--num-heads", "4"]))
    assert (parsed.teacher_num_heads, parsed.num_heads) == (2, 4)

    seen = {}
    check = kd.check_teacher_fits

    def spy(s, t, path):
        seen.update(student=s.config["num_heads"], teacher=t.config["num_heads"])
        check(s, t, path)

    monkeypatch.setattr(kd, "check_teacher_fits", spy)
    kd.run_masked_kd(_options(
        MaskedKDOptions, tmp_path, features, model="DiT", load_weight=str(tmp_path / "student.pt"), num_heads=4,
        teacher="DiT", load_teacher=str(tmp_path / "teacher.pt"), teacher_num_heads=2, beta_feat=0.0,
        save_model=str(tmp_path / "kd.pt")))
    assert seen == {"student": 4, "teacher": 2}
    distilled = read_checkpoint(tmp_path / "kd.pt")
    assert distilled["extra"] == {"script": "train_masked_kd.py", "steps": 2, "teacher": str(tmp_path / "teacher.pt"),
                                  "method": "masked-kd", "initialised_from": str(tmp_path / "student.pt")}
    assert load_model(tmp_path / "kd.pt").weights == "ema"

    run_train(_options(TrainOptions, tmp_path, features, load_weight=str(tmp_path / "kd.pt"),
                       save_model=str(tmp_path / "trained.pt")))
    trained = read_checkpoint(tmp_path / "trained.pt")
    assert trained["extra"] == {"script": "train.py", "steps": 2, "initialised_from": str(tmp_path / "kd.pt")}
    assert trained["config"] == distilled["config"] and trained["process"] == distilled["process"]
    assert load_model(tmp_path / "trained.pt").weights == "ema"
