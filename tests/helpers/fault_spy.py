"""Run by tests/test_reliability.py: train.py as users run it, killed with SIGKILL at a chosen point.

    python tests/helpers/fault_spy.py POINT:STEP train.py-arguments...

POINT is where the process dies (a power cut, an OOM kill, a node lost):
- step: at the start of optimisation step STEP;
- ckpt-write: halfway through writing the checkpoint of step STEP (its temporary file);
- manifest: after the checkpoint file of step STEP is in place, before the manifest lists it;
- log: halfway through the metrics line of step STEP;
- enospc: not a kill: the disk fills up halfway through the checkpoint of step STEP (its file's writes
  fail with ENOSPC from then on, as a full file system's do), and the run goes on to report it.
"""

import errno
import io
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import tinyfusion.checkpoint as checkpoint  # noqa: E402
import tinyfusion.engine as engine  # noqa: E402
import tinyfusion.fileio as fileio  # noqa: E402
import train  # noqa: E402
from tinyfusion.cli import run_script  # noqa: E402


def die():
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def install(point: str, step: int) -> None:
    if point == "step":
        original_step = engine.Trainer.train_step

        def train_step(self, x, y):
            if self.step == step:
                die()
            return original_step(self, x, y)
        engine.Trainer.train_step = train_step
    elif point == "ckpt-write":
        original_write = checkpoint.atomic_write

        def atomic_write(path, write):
            if Path(path).name != f"step-{step:07d}.pt":
                return original_write(path, write)

            def half(f):
                buffer = io.BytesIO()
                write(buffer)
                f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
                f.flush()
                die()
            return original_write(path, half)
        checkpoint.atomic_write = atomic_write
    elif point == "manifest":
        original_json = engine.atomic_write_json

        def atomic_write_json(path, obj):
            if Path(path).name == "manifest.json" and obj["checkpoints"][-1]["step"] == step:
                die()
            return original_json(path, obj)
        engine.atomic_write_json = atomic_write_json
    elif point == "log":
        original_log = engine.Trainer._log

        def _log(self, window, writer):
            if self.step == step:
                with open(self.run_dir / "metrics.jsonl", "a") as f:
                    f.write('{"step": %d, "loss": 0.' % step)
                die()
            return original_log(self, window, writer)
        engine.Trainer._log = _log
    elif point == "enospc":
        original_write, real_os = checkpoint.atomic_write, fileio.os
        full = {"now": False}

        class FullDisk(io.RawIOBase):
            """The temporary file of the checkpoint: 4 KiB fit, then every write fails with ENOSPC."""

            def __init__(self, fd):
                super().__init__()
                self.file, self.room = real_os.fdopen(fd, "wb", buffering=0), 4096

            def writable(self):
                return True

            def write(self, data):
                if len(data) > self.room:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                self.room -= len(data)
                return self.file.write(data)

            def fileno(self):
                return self.file.fileno()

            def close(self):
                self.file.close()
                super().close()

        class OsOfAFullDisk:
            def __getattr__(self, name):
                return getattr(real_os, name)

            @staticmethod
            def fdopen(fd, mode="r", *args, **kwargs):
                if full["now"]:
                    return io.BufferedWriter(FullDisk(fd))
                return real_os.fdopen(fd, mode, *args, **kwargs)

        def atomic_write(path, write):
            full["now"] = Path(path).name == f"step-{step:07d}.pt"
            try:
                return original_write(path, write)
            finally:
                full["now"] = False
        fileio.os = OsOfAFullDisk()
        checkpoint.atomic_write = atomic_write
    else:
        raise SystemExit(f"unknown fault point {point!r}")


if __name__ == "__main__":
    where, at = sys.argv[1].split(":")
    install(where, int(at))
    sys.argv = [train.__file__, *sys.argv[2:]]  # the script's name in its messages is train.py's
    run_script(train.main, train.parse_args)
