"""Run by tests/test_reliability.py: train.py as users run it, killed with SIGKILL at a chosen point.

    python tests/helpers/fault_spy.py POINT:STEP train.py-arguments...

POINT is where the process dies (a power cut, an OOM kill, a node lost):
- step: at the start of optimisation step STEP;
- ckpt-write: halfway through writing the checkpoint of step STEP (its temporary file);
- manifest: after the checkpoint file of step STEP is in place, before the manifest lists it;
- log: halfway through the metrics line of step STEP.
"""

import io
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import tinyfusion.checkpoint as checkpoint  # noqa: E402
import tinyfusion.engine as engine  # noqa: E402
import train  # noqa: E402


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
    else:
        raise SystemExit(f"unknown fault point {point!r}")


if __name__ == "__main__":
    where, at = sys.argv[1].split(":")
    install(where, int(at))
    train.main(train.parse_args(sys.argv[2:]))
