"""The tests' single-process script runs, started from a process that has already imported torch.

Importing torch costs about 3.5 s of CPU on this project's machines, and ending a process that holds it about 1 s
more; the suite runs its scripts as users do (`python train.py ...`) a few hundred times, and those imports were
about a third of its CPU time. So each test worker keeps one server process that imports torch and numpy once (and
timm and torchvision, which the library imports lazily), with the environment the scripts get, and then forks a
child per run. The child is the script's own process from there on: it changes to the run's directory, writes its
standard output and error to files, sets `sys.argv`, runs the script (or `-m` module) as `__main__` through runpy,
and exits with the script's status; an exception that escapes is printed with its traceback and exits 1, as python
does. Nothing of the tests' own process reaches it (the server is a fresh interpreter that ran no test).

The child ends as the interpreter ends a process (its threads joined, atexit handlers run, streams flushed) but
without tearing its modules down: a file a script left open and unflushed would lose its tail here, where a new
process would flush it while collecting it, so the tests would see it fail, never hide it.

What a fork cannot reproduce is the environment read when torch is imported (OMP_NUM_THREADS, ATEN_CPU_CAPABILITY,
MKL_CBWR, PYTHONPATH's sitecustomize, ...): a run whose environment differs from the server's in any variable but
pytest's per-test PYTEST_CURRENT_TEST is started as a new process, as are torchrun launches; the child's os.environ
is the run's. TINYFUSION_TESTS_FORK=0 starts every run as a new process.
"""

from __future__ import annotations

import atexit
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

ENABLED = os.environ.get("TINYFUSION_TESTS_FORK", "1") != "0"

# The server: imports, says it is ready, then one fork per request line; replies with the child's pid, then its
# exit status (negative: the signal that ended it, as subprocess reports it).
_SERVER = r'''
import atexit, json, os, runpy, sys, threading, traceback

import numpy  # noqa: F401
import torch  # noqa: F401
# imported by the library where it needs them (MAR's blocks, PNG grids), 2 s more: their import changes nothing a
# script computes
import timm.models.vision_transformer  # noqa: F401
import torchvision.utils  # noqa: F401


def run(request):
    """In the child: the script's process from here on."""
    os.environ.clear()
    os.environ.update(request["env"])
    os.chdir(request["cwd"])
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
        out = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(out, fd)
        os.close(out)
    argv = request["argv"]
    try:
        if argv[0] == "-m":
            sys.argv = [argv[1], *argv[2:]]  # runpy puts the module's path in argv[0]
            sys.path[0] = os.getcwd()
            runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
        else:
            sys.argv = list(argv)
            sys.path[0] = os.path.dirname(os.path.abspath(argv[0]))
            runpy.run_path(argv[0], run_name="__main__")
        code = 0
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            code = e.code or 0
        else:
            print(e.code, file=sys.stderr)
            code = 1
    except BaseException:
        traceback.print_exc()
        code = 1
    return code


def serve():
    replies = os.fdopen(os.dup(1), "w")
    os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
    print(json.dumps({"ready": True}), file=replies, flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            replies.close()
            sys.stdin.close()
            code = run(request)
            # The interpreter's shutdown, less its module teardown (about 1 s with torch loaded, in every process):
            # wait for the threads, run the atexit handlers (logging's flush among them), flush the streams.
            threading._shutdown()
            atexit._run_exitfuncs()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        print(json.dumps({"pid": pid}), file=replies, flush=True)
        _, status = os.waitpid(pid, 0)
        print(json.dumps({"status": os.waitstatus_to_exitcode(status)}), file=replies, flush=True)


serve()
'''


# Set per test by pytest; read by nobody at import time.
RUNTIME_ONLY = ("PYTEST_CURRENT_TEST",)


def _import_time(env: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in env.items() if k not in RUNTIME_ONLY}


class ForkServer:
    """One server process for the runs of one environment."""

    def __init__(self, env: dict[str, str], cwd: Path):
        self.env = _import_time(env)
        self.proc = subprocess.Popen([sys.executable, "-c", _SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, env=self.env, cwd=cwd)
        self._pending = b""
        self._expect("ready")

    def _expect(self, key: str, timeout: float | None = None):
        """The next reply's `key`, or None when none came within `timeout` seconds (read from the pipe's file
        descriptor: a buffered reader could hold a reply that select would not see)."""
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._pending:
            if timeout is not None and not select.select([fd], [], [], timeout)[0]:
                return None
            chunk = os.read(fd, 4096)
            if not chunk:
                raise RuntimeError(f"the tests' fork server ended (status {self.proc.poll()})")
            self._pending += chunk
        line, self._pending = self._pending.split(b"\n", 1)
        return json.loads(line)[key]

    def run(self, args: list[str], cwd: Path, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
        cmd = [sys.executable, *args]
        with tempfile.TemporaryDirectory(prefix="forked-run-") as tmp:
            out, err = Path(tmp) / "stdout", Path(tmp) / "stderr"
            request = {"argv": list(args), "cwd": str(cwd), "env": env, "stdout": str(out), "stderr": str(err)}
            self.proc.stdin.write((json.dumps(request) + "\n").encode())
            self.proc.stdin.flush()
            pid = self._expect("pid")
            status = self._expect("status", timeout)
            if status is None:
                os.kill(pid, signal.SIGKILL)
                self._expect("status")
                raise subprocess.TimeoutExpired(cmd, timeout, out.read_text(), err.read_text())
            # read as subprocess.run(text=True) decodes: the locale's encoding, universal newlines
            return subprocess.CompletedProcess(cmd, status, out.read_text(), err.read_text())

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()


_servers: list[ForkServer] = []


def forked_run(args: list[str], cwd: Path, env: dict[str, str], base_env: dict[str, str], timeout: float
               ) -> subprocess.CompletedProcess | None:
    """`python *args` in `cwd` with `env`, forked from the server started with `base_env` (the environment the
    scripts get when a test asks for nothing else), or None where a fork cannot stand for a new process: an
    environment that differs at import time, `-c` code, or forking turned off."""
    if not ENABLED or args[:1] == ["-c"] or _import_time(env) != _import_time(base_env):
        return None
    if not _servers:
        _servers.append(ForkServer(base_env, cwd))
        atexit.register(_servers[0].close)
    return _servers[0].run(args, cwd, env, timeout)
