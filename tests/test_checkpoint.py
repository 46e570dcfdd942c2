"""The one checkpoint loader: every format users hold, safety, inference and clear errors."""

import argparse
import os
import pickle

import pytest
import torch
from helpers import tiny_dit
from safetensors.torch import save_file

from models import DiT, DiT_models, GatedModel, prune_depth
from tinyfusion.checkpoint import atomic_save, load_model, pruned_lineage, read_checkpoint, save_model


def _same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb)
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], atol=0, rtol=0)


def test_plain_state_dict_round_trip(tmp_path):
    model = tiny_dit()
    torch.save(model.state_dict(), tmp_path / "plain.pt")
    loaded = load_model(tmp_path / "plain.pt", "DiT", num_heads=2)
    assert loaded.weights == "plain" and loaded.lineage is None
    assert loaded.config == model.config
    _same_weights(loaded.model, model)


def test_training_checkpoint_prefers_ema_and_allows_args_namespace(tmp_path):
    model, ema = tiny_dit(seed=0), tiny_dit(seed=1)
    opt = torch.optim.AdamW(model.parameters())
    ckpt = {"model": {f"module.{k}": v for k, v in model.state_dict().items()},
            "ema": ema.state_dict(), "opt": opt.state_dict(), "args": argparse.Namespace(model="DiT-S/2", lr=1e-4),
            "train_steps": 7}
    torch.save(ckpt, tmp_path / "train.pt")
    loaded = load_model(tmp_path / "train.pt", "DiT", num_heads=2)
    assert loaded.weights == "ema" and loaded.extra["args"]["lr"] == 1e-4
    _same_weights(loaded.model, ema)
    loaded = load_model(tmp_path / "train.pt", "DiT", num_heads=2, weights="model")  # module. prefix stripped
    assert loaded.weights == "model"
    _same_weights(loaded.model, model)


def test_compiled_model_prefix_is_stripped(tmp_path):
    model = tiny_dit()
    torch.save({"model": {f"_orig_mod.{k}": v for k, v in model.state_dict().items()}}, tmp_path / "c.pt")
    _same_weights(load_model(tmp_path / "c.pt", "DiT", num_heads=2).model, model)


def test_tinyfusion_pruned_file_with_gate_tensors(tmp_path):
    pruned = prune_depth(tiny_dit(), [0, 3])
    sd = dict(pruned.state_dict(), **{"gumbel_gates.0": torch.zeros(1, 2), "options.0": torch.eye(2)})
    torch.save(sd, tmp_path / "tf.pt")
    loaded = load_model(tmp_path / "tf.pt", "DiT", num_heads=2)
    assert loaded.config["depth"] == 2 and loaded.extra["ignored_keys"] == ["gumbel_gates.0", "options.0"]
    _same_weights(loaded.model, pruned)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_self_describing_round_trip_with_lineage(tmp_path, suffix):
    source = tiny_dit()
    torch.save(source.state_dict(), tmp_path / "source.pt")
    src = load_model(tmp_path / "source.pt", "DiT", num_heads=2)
    pruned = prune_depth(src.model, [1, 3])
    lineage = pruned_lineage(src, [1, 3], method="index")
    save_model(tmp_path / f"pruned{suffix}", pruned, lineage=lineage, extra={"note": "x"})
    loaded = load_model(tmp_path / f"pruned{suffix}")  # no --model, no --num-heads
    assert loaded.config == dict(source.config, depth=2, block_widths=source.config["block_widths"][:2])
    assert loaded.lineage["kept_indices"] == [1, 3] and loaded.lineage["source_depth"] == 4
    assert len(loaded.lineage["source"]["sha256"]) == 64
    assert loaded.extra["note"] == "x"
    _same_weights(loaded.model, pruned)
    # pruning again composes the lineage back to the original blocks
    again = pruned_lineage(loaded, [1], method="index")
    assert again["kept_indices"] == [3] and again["source_depth"] == 4


def test_plain_safetensors(tmp_path):
    model = tiny_dit()
    save_file(model.state_dict(), str(tmp_path / "w.safetensors"))
    _same_weights(load_model(tmp_path / "w.safetensors", "DiT", num_heads=2).model, model)


def test_saved_ema_is_preferred(tmp_path):
    model, ema = tiny_dit(seed=0), tiny_dit(seed=1)
    save_model(tmp_path / "m.pt", model, ema=ema)
    _same_weights(load_model(tmp_path / "m.pt").model, ema)
    _same_weights(load_model(tmp_path / "m.pt", weights="model").model, model)


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_malicious_pickle_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"model": tiny_dit().state_dict(), "payload": _Evil()}, path)
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        with pytest.raises(ValueError, match="refusing to load"):
            load_model(path, num_heads=2)
    finally:
        os.chdir(cwd)
    assert not (tmp_path / "pwned").exists()
    # a raw pickle (not a torch zip file) is refused too
    (tmp_path / "raw.pt").write_bytes(pickle.dumps(_Evil()))
    with pytest.raises(ValueError):
        read_checkpoint(tmp_path / "raw.pt")


def test_official_widths_infer_their_head_count():
    for name in ("DiT-XL/2", "DiT-L/4", "DiT-B/8", "DiT-S/2", "DiT-D14/2"):
        with torch.device("meta"):
            model = DiT_models[name](input_size=32)
        assert DiT.config_from_state_dict(model.state_dict()) == model.config


def test_unknown_width_needs_the_head_count(tmp_path):
    torch.save(tiny_dit().state_dict(), tmp_path / "w.pt")
    with pytest.raises(ValueError, match="--num-heads"):
        load_model(tmp_path / "w.pt")


def test_model_name_that_disagrees_lists_the_fields(tmp_path):
    save_model(tmp_path / "m.pt", tiny_dit())
    with pytest.raises(ValueError) as info:
        load_model(tmp_path / "m.pt", "DiT-S/2")
    message = str(info.value)
    assert "depth: the model name says 12, the checkpoint has 4" in message
    assert "hidden_size: the model name says 384, the checkpoint has 32" in message
    assert "patch_size" not in message  # both are 2


def test_gates_wrap_the_loaded_model(tmp_path):
    save_model(tmp_path / "m.pt", tiny_dit(depth=4))
    loaded = load_model(tmp_path / "m.pt", groups="2x1:2")
    assert isinstance(loaded.model, GatedModel) and loaded.model.gates.depth == 4
    with pytest.raises(ValueError, match="cover 6 blocks"):
        load_model(tmp_path / "m.pt", groups="3x1:2")
    # a gated preset name checks the base architecture, then wraps it in its groups
    with pytest.raises(ValueError, match="depth: the model name says 14, the checkpoint has 4"):
        load_model(tmp_path / "m.pt", "DiT-D14-1-2")
    with torch.device("meta"):
        gated = DiT_models["DiT-D14-1-2"](input_size=4)
    assert isinstance(gated, GatedModel) and gated.gates.groups == [(1, 2)] * 7


def test_missing_and_truncated_files(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_model(tmp_path / "nope.pt")
    torch.save(tiny_dit().state_dict(), tmp_path / "w.pt")
    data = (tmp_path / "w.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="is not a checkpoint: it is a truncated zip archive"):
        load_model(tmp_path / "cut.pt", "DiT", num_heads=2)


def test_weights_that_do_not_fit_are_explained(tmp_path):
    sd = tiny_dit().state_dict()
    sd["blocks.0.attn.qkv.weight"] = torch.zeros(3, 3)
    save_model(tmp_path / "m.pt", tiny_dit())
    record = torch.load(tmp_path / "m.pt", weights_only=True)
    record["model"] = sd
    torch.save(record, tmp_path / "edited.pt")
    with pytest.raises(ValueError, match="differs from the SHA-256 written with it.*edited it on purpose"):
        load_model(tmp_path / "edited.pt")
    del record["integrity"]  # an edit on purpose drops the digest of the old content
    torch.save(record, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="wrong shape"):
        load_model(tmp_path / "bad.pt")


def test_atomic_save_leaves_no_partial_file(tmp_path):
    from tinyfusion.fileio import atomic_write

    def half_then_fail(f):
        f.write(b"partial")
        raise RuntimeError("boom")

    atomic_save({"a": torch.ones(2)}, tmp_path / "x.pt")
    with pytest.raises(RuntimeError, match="boom"):
        atomic_write(tmp_path / "x.pt", half_then_fail)
    with pytest.raises(TypeError, match="cannot hash"):  # not a checkpoint's content: refused before writing
        atomic_save({"a": object()}, tmp_path / "x.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.pt"]
    assert torch.load(tmp_path / "x.pt", weights_only=True)["a"].sum() == 2
