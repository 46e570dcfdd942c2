"""What the help texts, the README and docs/ARCHITECTURE.md say, held against the code (issue 20, "Texts")."""

import importlib
import re
from pathlib import Path

import numpy as np
import pytest
from helpers import ROOT, run_cli, tiny_dit

BENCHMARKS = ["benchmarks.attention", "benchmarks.diffusers_parity", "benchmarks.forward", "benchmarks.mar_speed",
              "benchmarks.nfe", "benchmarks.training"]


def help_text(module_name: str, capsys) -> str:
    module = importlib.import_module(module_name)
    with pytest.raises(SystemExit) as exit_info:
        module.parse_args(["--help"])
    assert exit_info.value.code == 0
    return capsys.readouterr().out


def flag_named(text: str, flag: str) -> bool:
    """Whether `text` names `flag` itself (not as the tail of a longer flag)."""
    return re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", text) is not None


#################################################################################
#                                   Help texts                                  #
#################################################################################

def test_prune_by_score_help_names_its_protect_flags(capsys):
    text = help_text("prune_by_score", capsys)
    assert flag_named(text, "--protect-first") and flag_named(text, "--protect-last")
    assert not flag_named(text, "--keep-first") and not flag_named(text, "--keep-last")


@pytest.mark.parametrize("script", ["sample", "sample_ddp"])
def test_the_samplers_say_every_family(script, capsys):
    first_line = help_text(script, capsys).split("\n\n", 1)[1].splitlines()[0]
    assert all(family in first_line for family in ("DiT", "SiT", "MAR")), first_line


def test_the_readme_lists_each_flag_of_sample_py_once():
    row = next(line for line in (ROOT / "README.md").read_text().splitlines() if line.startswith("| `sample.py` |"))
    for flag in re.findall(r"`(--[\w-]+)`", row):
        assert row.count(f"`{flag}`") == 1, flag


#################################################################################
#                                   Benchmarks                                  #
#################################################################################

@pytest.mark.parametrize("module", BENCHMARKS)
def test_benchmarks_say_num_sampling_steps_as_the_scripts_do(module, capsys):
    text = help_text(module, capsys)
    assert not flag_named(text, "--sampling-steps")
    if module in ("benchmarks.forward", "benchmarks.mar_speed"):  # the ones that time a sampler's steps
        args = importlib.import_module(module).parse_args(["--num-sampling-steps", "3"])
        assert args.num_sampling_steps == 3


def test_readme_names_no_retired_benchmark_flag():
    assert not flag_named((ROOT / "README.md").read_text(), "--sampling-steps")


def test_the_forward_benchmark_takes_every_registered_sampler():
    from benchmarks.forward import parse_args
    from processes import all_samplers

    for sampler in all_samplers():
        assert parse_args(["--sampler", sampler]).sampler == sampler
    assert parse_args([]).sampler is None  # each model's process's first


@pytest.mark.parametrize("module", BENCHMARKS)
def test_benchmark_modules_end_through_run_script(module):
    source = (ROOT / Path(*module.split("."))).with_suffix(".py").read_text()
    main_block = source.split('if __name__ == "__main__":', 1)[1]
    assert "run_script(main, parse_args)" in main_block and "main(parse_args())" not in main_block


def _cosine_dit(path: Path) -> dict:
    """A tiny DiT file that records a Gaussian process other than its family's default (cosine, 100 steps)."""
    from processes import create_process
    from tinyfusion.checkpoint import save_model

    record = create_process({"name": "gaussian", "noise_schedule": "cosine", "diffusion_steps": 100}).record()
    save_model(path, tiny_dit(depth=2), process=record)
    return record


def _sit(path: Path) -> None:
    """A tiny SiT file (it records the transport process)."""
    from helpers import tiny_sit

    from tinyfusion.checkpoint import save_model

    save_model(path, tiny_sit(depth=2))


def test_a_checkpoint_is_timed_on_the_process_it_records(tmp_path):
    import torch

    from benchmarks.harness import bench_model, sampling_plan
    from processes import create_process
    from tinyfusion.errors import UserError

    record = _cosine_dit(tmp_path / "cosine.pt")
    bm = bench_model(str(tmp_path / "cosine.pt"), 8, torch.device("cpu"))
    assert bm.process == record and bm.process != create_process({"name": "gaussian"}).record()
    [(process, spec)] = sampling_plan([bm], 2, 1.0, None, "fp32")
    assert process.record() == record and spec.sampler == "ddpm"

    _sit(tmp_path / "sit.pt")
    sit = bench_model(str(tmp_path / "sit.pt"), 8, torch.device("cpu"))
    assert sampling_plan([sit], 2, 1.0, None, "fp32")[0][1].sampler == "ode"
    with pytest.raises(UserError, match="--sampler ddpm.*transport process"):
        sampling_plan([bm, sit], 2, 1.0, "ddpm", "fp32")
    registry = bench_model("DiT-Nano/2", 2, torch.device("cpu"), num_classes=4)
    assert registry.process == create_process({"name": "gaussian"}).record()  # a registry model: the default


def test_a_sampler_the_model_process_lacks_is_one_line_exit_2(tmp_path):
    _sit(tmp_path / "sit.pt")
    proc = run_cli(["-m", "benchmarks.forward", "--models", str(tmp_path / "sit.pt"), "--batch-sizes", "1",
                    "--num-sampling-steps", "2", "--sampler", "ddpm", "--device", "cpu", "--warmup", "0",
                    "--repeats", "1"], check=False, timeout=300)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "--sampler ddpm" in lines[0] and "ode, sde" in lines[0], proc.stderr
    assert "| model |" not in proc.stdout  # refused before any timing


def test_benchmarks_refuse_an_out_that_is_their_checkpoint(tmp_path):
    from benchmarks import forward, training
    from tinyfusion.errors import UserError

    ckpt = tmp_path / "model.pt"
    _cosine_dit(ckpt)
    before = ckpt.read_bytes()
    with pytest.raises(UserError, match="--out .* same file as --models"):
        forward.main(forward.parse_args(["--models", "DiT-Nano/2", str(ckpt), "--out", str(ckpt)]))
    with pytest.raises(UserError, match="--out .* same file as --model"):
        training.main(training.parse_args(["--model", str(ckpt), "--out", str(ckpt)]))
    assert ckpt.read_bytes() == before


#################################################################################
#                                 ARCHITECTURE.md                               #
#################################################################################

def _library_sources():
    skip = {".venv", "tests", ".git"}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT).parts
        if not skip & set(parts):
            yield path, path.read_text()


def test_nothing_outside_models_reads_the_depth_of_a_config():
    for path, source in _library_sources():
        if path.relative_to(ROOT).parts[0] != "models":
            assert not re.search(r"""\[["']depth["']\]""", source), path


def test_images_are_decoded_by_one_function():
    for path, source in _library_sources():
        if path.relative_to(ROOT) != Path("tinyfusion/images.py"):
            assert "Image.open(" not in source, path


def test_the_layer_table_counts_its_rows():
    doc = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    count = doc.split(" layers.", 1)[0].split()[-1]
    table = doc.split("| layer |", 1)[1].split("\n\n", 1)[0]
    rows = [line for line in table.splitlines()[2:] if line.startswith("|")]
    assert {"Four": 4, "Five": 5, "Six": 6}[count] == len(rows)
    assert "errors.py" in table


def test_the_quickstart_halves_keep_every_image(tmp_path):
    """The doc's statement: the quickstart's real_halves keep every image (the first half takes the odd one),
    unlike split_halves; the published floor is against these halves."""
    from PIL import Image

    from pipelines.quickstart import real_halves

    for i in range(5):
        (tmp_path / "data" / str(i % 2)).mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((4, 4, 3), 40 * i, dtype=np.uint8)).save(tmp_path / "data" / str(i % 2) / f"{i}.png")
    (tmp_path / "out").mkdir()
    a, b, images, labels = real_halves(tmp_path / "data", 4, tmp_path / "out", seed=0)
    part_a, part_b = np.load(a)["arr_0"], np.load(b)["arr_0"]
    assert (len(part_a), len(part_b)) == (3, 2)
    assert sorted(int(x[0, 0, 0]) for x in np.concatenate([part_a, part_b])) == [0, 40, 80, 120, 160]


def test_the_family_contract_names_what_the_library_uses_of_a_model():
    section = (ROOT / "docs" / "ARCHITECTURE.md").read_text().split("## Adding a model family", 1)[1]
    contract = section.split("\n2. ", 1)[0]
    for name in ("arch", "stacks", "config", "data_shape", "num_classes", "label_dropout", "forward",
                 "forward_with_cfg", "gradient_checkpointing", "default_process", "config_from_state_dict",
                 "optimizer_recipe", "default_cfg_scale", "sample_tokens"):
        assert f"`{name}" in contract, name
