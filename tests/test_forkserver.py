"""The fork server (tinyfusion/launcher.py, the tests' helpers/forkserver.py) gives a script what a new process
gives it."""

import subprocess
import sys
import textwrap

import pytest
from helpers import BASE_ENV, ROOT, SCRIPT_ENV, forkserver, run_cli

pytestmark = pytest.mark.skipif(not forkserver.ENABLED, reason="TINYFUSION_TESTS_FORK=0: every run is a new process")

SCRIPT = textwrap.dedent("""
    import atexit, os, sys, threading, time
    import torch

    atexit.register(lambda: print("atexit ran", flush=True))
    threading.Thread(target=lambda: (time.sleep(0.2), print("thread joined"))).start()
    print("argv", sys.argv[1:], "cwd", os.getcwd(), "threads", torch.get_num_threads())
    print("env", os.environ.get("PYTEST_CURRENT_TEST"), "main", __name__, "path0", sys.path[0])
    mode = sys.argv[1]
    if mode == "exit":
        sys.exit(int(sys.argv[2]))
    if mode == "message":
        sys.exit("a message")
    if mode == "raise":
        raise ValueError("a bug")
    if mode == "sleep":
        time.sleep(60)
    print("to stderr", file=sys.stderr)
""")


@pytest.fixture
def script(tmp_path):
    path = tmp_path / "probe.py"
    path.write_text(SCRIPT)
    return path


def _new_process(args, cwd, env=None):
    return subprocess.run([sys.executable, *args], cwd=cwd, env={**BASE_ENV, **(env or {})}, capture_output=True,
                          text=True, timeout=120)


@pytest.mark.parametrize("mode", [["ok"], ["exit", "0"], ["exit", "3"], ["message"], ["raise"]])
def test_a_forked_run_exits_and_prints_as_a_new_process(script, tmp_path, mode):
    env = {**BASE_ENV, "PYTEST_CURRENT_TEST": "probe"}  # pytest's, set per test: the child's own environment
    forked = forkserver.forked_run([str(script), *mode], tmp_path, env, BASE_ENV, timeout=120)
    assert forked is not None
    new = _new_process([str(script), *mode], tmp_path, {"PYTEST_CURRENT_TEST": "probe"})
    assert forked.returncode == new.returncode and forked.stdout == new.stdout
    if mode == ["raise"]:  # the traceback's last lines (the frames above the script's differ: runpy's)
        assert forked.stderr.splitlines()[-3:] == new.stderr.splitlines()[-3:]
        assert "Traceback (most recent call last)" in forked.stderr
    else:
        assert forked.stderr == new.stderr
    assert "thread joined" in forked.stdout and forked.stdout.rstrip().endswith("atexit ran")
    for seen in ("env probe", f"cwd {tmp_path}", "threads 1", "main __main__"):
        assert seen in forked.stdout, seen


def test_modules_run_as_with_dash_m_and_keep_the_repository_importable():
    proc = run_cli(["-m", "benchmarks.training", "--help"])
    assert proc.stdout.startswith("usage: training.py")
    assert proc.stdout == _new_process(["-m", "benchmarks.training", "--help"], ROOT).stdout


def test_a_run_past_its_timeout_is_killed(script, tmp_path):
    with pytest.raises(subprocess.TimeoutExpired):
        forkserver.forked_run([str(script), "sleep"], tmp_path, dict(BASE_ENV), BASE_ENV, timeout=2)
    assert forkserver.forked_run([str(script), "ok"], tmp_path, dict(BASE_ENV), BASE_ENV, 60).returncode == 0


def test_what_torch_reads_at_import_starts_a_new_process(script, tmp_path):
    """Another OMP_NUM_THREADS (or any variable but pytest's per-test one) is not forked: torch has read it."""
    env = {**BASE_ENV, "OMP_NUM_THREADS": "2"}
    assert forkserver.forked_run([str(script), "ok"], tmp_path, env, BASE_ENV, 60) is None
    proc = run_cli([str(script), "ok"], cwd=tmp_path, env={"OMP_NUM_THREADS": "2"})
    assert "threads 2" in proc.stdout
    assert SCRIPT_ENV["OMP_NUM_THREADS"] == "1"


def test_a_step_log_gets_the_output_after_its_command_line(script, tmp_path):
    """The quickstart's way: stdout and stderr into one log that already holds the command line (appended)."""
    from tinyfusion.launcher import ForkServer

    server = ForkServer(BASE_ENV, ROOT)
    try:
        log = tmp_path / "step.log"
        log.write_text("$ the command\n")
        assert server.run([str(script), "ok"], cwd=tmp_path, env=dict(BASE_ENV), stdout=log, append=True) == 0
        lines = log.read_text().splitlines()
        assert lines[0] == "$ the command" and "to stderr" in lines and lines[-1] == "atexit ran"
        with pytest.raises(ValueError, match="environment differs"):
            server.run([str(script), "ok"], cwd=tmp_path, env={**BASE_ENV, "OMP_NUM_THREADS": "2"}, stdout=log)
    finally:
        server.close()
    assert server.proc.returncode == 0
