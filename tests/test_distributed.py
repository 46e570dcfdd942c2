"""The distributed helpers under real torchrun (gloo on CPU), and as a world of one."""

import json

from helpers import run_cli


def test_torchrun_two_processes_all_reduce(tmp_path):
    out = tmp_path / "result.json"
    run_cli(["tests/helpers/dist_worker.py", str(out)], nproc=2, timeout=180)
    result = json.loads(out.read_text())
    assert result["world_size"] == 2 and result["device"] == "cpu"
    assert result["mean"] == [1.5, 15.0]
    assert result["sum"] == [3.0, 30.0]
    assert result["input_unchanged"] == [1.0, 10.0]
    assert result["token"] == {"seed": 1234}
    assert result["ranks"] == [0, 1]


def test_plain_python_is_a_world_of_one(tmp_path):
    out = tmp_path / "result.json"
    run_cli(["tests/helpers/dist_worker.py", str(out)])
    result = json.loads(out.read_text())
    assert result["world_size"] == 1 and result["mean"] == [1.0, 10.0] and result["ranks"] == [0]
