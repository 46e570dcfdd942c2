"""The tests' single-process script runs, forked from a process that has imported torch (tinyfusion/launcher.py).

Each test worker keeps one `ForkServer`, started with the environment a run gets when a test asks for nothing else
(`BASE_ENV` of helpers). A run whose environment differs at import time (another OMP_NUM_THREADS, MKL_CBWR,
ATEN_CPU_CAPABILITY, a PYTHONPATH with a sitecustomize, ...), `-c` code and torchrun launches start new processes.
TINYFUSION_TESTS_FORK=0 starts every run as a new process.
"""

from __future__ import annotations

import atexit
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from tinyfusion.launcher import AVAILABLE, ForkServer

ENABLED = AVAILABLE and os.environ.get("TINYFUSION_TESTS_FORK", "1") != "0"
_servers: list[ForkServer] = []


def forked_run(args: list[str], cwd: Path, env: dict[str, str], base_env: dict[str, str], timeout: float
               ) -> subprocess.CompletedProcess | None:
    """`python *args` in `cwd` with `env`, forked from the server started with `base_env`, as subprocess.run with
    captured text output returns it; or None where a fork cannot stand for a new process."""
    if not ENABLED or args[:1] == ["-c"]:
        return None
    if not _servers:
        _servers.append(ForkServer(base_env, cwd))
        atexit.register(_servers[0].close)
    if not _servers[0].accepts(env):
        return None
    cmd = [sys.executable, *args]
    with tempfile.TemporaryDirectory(prefix="forked-run-") as tmp:
        out, err = Path(tmp) / "stdout", Path(tmp) / "stderr"
        try:
            status = _servers[0].run(args, cwd=cwd, env=env, stdout=out, stderr=err, timeout=timeout)
        except subprocess.TimeoutExpired as e:
            raise subprocess.TimeoutExpired(cmd, timeout, out.read_text(), err.read_text()) from e
        # read as subprocess.run(text=True) decodes: the locale's encoding, universal newlines
        return subprocess.CompletedProcess(cmd, status, out.read_text(), err.read_text())
