"""Scripts run as processes forked from a server that has already imported torch.

On this project's CPUs, starting a script costs about 3.5 s of CPU before its first line runs (importing torch) and
about 1 s after its last (the interpreter tearing torch's modules down). The quickstart runs about 70 short scripts
and the tests a few hundred, so that was a third of their time. A `ForkServer` is a process that imports torch (and
what else it is told to) once, and then forks one child per run: the child is the script's own process from there
on. It takes the run's environment, directory and arguments, writes its output to the run's file(s), runs the script
(`path.py` or `-m module`) as `__main__` through runpy, and exits with the script's status; an exception that escapes
is printed with its traceback and exits 1, as python does. It ends as the interpreter ends a process (threads joined,
atexit handlers run, streams flushed) without tearing its modules down: a file a script left open and unflushed would
lose its tail, where a new process would flush it while collecting it (the scripts close what they write).

What a fork cannot give a run is an environment read when torch was imported (OMP_NUM_THREADS, MKL_CBWR,
ATEN_CPU_CAPABILITY, PYTHONPATH, ...): callers fork only runs whose environment is the server's, apart from variables
nothing reads at import (`RUNTIME_ONLY`). The server itself never touches CUDA (importing torch does not initialise
it), so a child may. Linux only: where fork is not the platform's way (macOS, Windows) callers start new processes.

Protocol (the server's stdin and stdout, one JSON object per line): a request {"argv", "cwd", "env", "stdout",
"stderr" (a path, or null: into stdout), "append"}; replies {"pid"} when the child is forked, then {"status"}: its
exit status, negative for the signal that ended it (as subprocess reports it).
"""

from __future__ import annotations

import atexit
import importlib
import json
import os
import runpy
import select
import signal
import subprocess
import sys
import threading
import traceback
from typing import Sequence

# Set per test by pytest; read by nothing at import time.
RUNTIME_ONLY = ("PYTEST_CURRENT_TEST",)
# What the scripts import first (torch), and what the library imports where it needs it (timm for MAR's blocks,
# torchvision for PNG grids): importing them changes nothing a script computes.
PRELOAD = ("numpy", "torch", "timm.models.vision_transformer", "torchvision.utils")
AVAILABLE = sys.platform.startswith("linux")


def import_time_env(env: dict[str, str]) -> dict[str, str]:
    """The variables of `env` that a process may have read when it imported torch."""
    return {k: v for k, v in env.items() if k not in RUNTIME_ONLY}


class ForkServer:
    """A server process that has imported `preload`, started with `env` in `cwd`; `run` forks a script from it.

    One run at a time (a thread that runs several at once keeps one server each); `close` ends it.
    """

    def __init__(self, env: dict[str, str], cwd: str | os.PathLike, preload: Sequence[str] = PRELOAD):
        self.env = dict(env)
        self.proc = subprocess.Popen([sys.executable, "-m", "tinyfusion.launcher", *preload], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, env=self.env, cwd=cwd)  # its stderr: the caller's
        self._pending = b""
        self._reply("ready")

    def accepts(self, env: dict[str, str]) -> bool:
        """Whether a run with `env` may be forked from this server (the same environment at import time)."""
        return import_time_env(env) == import_time_env(self.env)

    def run(self, argv: Sequence[str], *, cwd: str | os.PathLike, env: dict[str, str], stdout: str | os.PathLike,
            stderr: str | os.PathLike | None = None, append: bool = False, timeout: float | None = None) -> int:
        """`python *argv` forked, its output written to `stdout` (and `stderr`; None: into `stdout`, as
        subprocess's stderr=STDOUT), appended to or replacing what the files hold; its exit status.

        Raises:
            subprocess.TimeoutExpired: the run took longer than `timeout` seconds (it is killed).
        """
        if not self.accepts(env):
            raise ValueError("the run's environment differs from the fork server's at import time")
        request = {"argv": list(argv), "cwd": str(cwd), "env": env, "stdout": str(stdout),
                   "stderr": None if stderr is None else str(stderr), "append": append}
        self.proc.stdin.write((json.dumps(request) + "\n").encode())
        self.proc.stdin.flush()
        pid = self._reply("pid")
        status = self._reply("status", timeout)
        if status is None:
            os.kill(pid, signal.SIGKILL)
            self._reply("status")
            raise subprocess.TimeoutExpired([sys.executable, *argv], timeout)
        return status

    def _reply(self, key: str, timeout: float | None = None):
        """The next reply's `key`, or None when none came within `timeout` seconds (read from the pipe's file
        descriptor: a buffered reader could hold a reply that select would not see)."""
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._pending:
            if timeout is not None and not select.select([fd], [], [], timeout)[0]:
                return None
            chunk = os.read(fd, 4096)
            if not chunk:
                raise RuntimeError(f"the fork server ended (exit status {self.proc.poll()})")
            self._pending += chunk
        line, self._pending = self._pending.split(b"\n", 1)
        return json.loads(line)[key]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _child(request: dict) -> int:
    """In the forked child: the script's process from here on; its exit status."""
    os.environ.clear()
    os.environ.update(request["env"])
    os.chdir(request["cwd"])
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
    flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if request["append"] else os.O_TRUNC)
    out = os.open(request["stdout"], flags, 0o644)
    err = out if request["stderr"] is None else os.open(request["stderr"], flags, 0o644)
    os.dup2(out, 1)
    os.dup2(err, 2)
    for fd in {out, err}:
        os.close(fd)
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
        return 0
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            return e.code or 0
        print(e.code, file=sys.stderr)
        return 1
    except BaseException:  # what python prints for an exception that ends a script
        traceback.print_exc()
        return 1


def serve(preload: Sequence[str]) -> None:
    for name in preload:
        importlib.import_module(name)
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
            code = _child(request)
            # the interpreter's end of a process, less the module teardown (see the module's docstring)
            threading._shutdown()
            atexit._run_exitfuncs()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        print(json.dumps({"pid": pid}), file=replies, flush=True)
        _, status = os.waitpid(pid, 0)
        print(json.dumps({"status": os.waitstatus_to_exitcode(status)}), file=replies, flush=True)


if __name__ == "__main__":
    serve(sys.argv[1:])
