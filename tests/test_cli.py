"""What a newcomer meets first: --help of every script, and errors that come before any heavy work."""

import importlib
import re

import numpy as np
import pytest
from helpers import ROOT, no_network_path, run_cli

SCRIPTS = ["evaluator", "extract_features", "prune_by_index", "prune_by_learning", "prune_by_score", "quickstart",
           "sample", "sample_ddp", "train", "train_masked_kd"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_shows_every_default_once(script, capsys):
    module = importlib.import_module(script)
    with pytest.raises(SystemExit) as exit_info:
        module.parse_args(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    options = text.split("options:", 1)[1]
    # one block per option: its flag line and the indented lines below it
    blocks = re.split(r"\n  (?=-)", options)
    for block in blocks:
        flat = " ".join(block.split())
        assert flat.count("(default:") <= 1, flat
        assert "(default: None)" not in flat and "(default: False)" not in flat, flat
    if "--global-seed GLOBAL_SEED\n" in options:
        assert options.split("--global-seed GLOBAL_SEED\n", 1)[1].split()[:2] == ["(default:", "0)"]


def test_script_docstrings_show_their_line_continuations():
    for script in SCRIPTS:
        source = (ROOT / f"{script}.py").read_text()
        doc = source.split('"""', 2)[1]
        if "\\\n" in doc:  # a continuation inside a docstring is eaten unless the docstring is raw
            assert source.lstrip().startswith('r"""'), script


def test_the_evaluator_checks_its_inputs_before_loading_any_network(tmp_path):
    np.savez(tmp_path / "ref.npz", arr_0=np.zeros((4, 8, 8, 3), np.uint8))
    proc = run_cli(["evaluator.py", str(tmp_path / "ref.npz"), str(tmp_path / "missing.npz"), "--inception-weights",
                    str(tmp_path / "no-such-weights.pth")], check=False,
                   env={"PYTHONPATH": no_network_path(tmp_path), "TORCH_HOME": str(tmp_path / "hub")})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "missing.npz" in proc.stderr and "no-such-weights" not in proc.stderr
    assert "network access attempted" not in proc.stderr
