"""The one runtime bootstrap of every script: process group, device, precision, TF32, seed, logging.

    with bootstrap(opts, seed=opts.global_seed) as rt:
        ...  # rt.env (rank, world size, device), rt.precision, rt.logger

Plain `python script.py` is a world of one process; under torchrun each process takes the GPU of
its LOCAL_RANK (gloo on CPU, nccl on CUDA). The process group is torn down on the way out, also
after an error.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from typing import Iterator

import torch

from .distributed import DistEnv, cleanup, create_logger, init_distributed
from .options import RuntimeOptions
from .precision import enable_tf32, resolve_precision


@dataclasses.dataclass
class Runtime:
    """This process's place in the run: env (rank, world, device), resolved precision, logger."""

    env: DistEnv
    precision: str
    logger: logging.Logger

    def log_to(self, log_dir: str | os.PathLike) -> None:
        """From now on, rank 0 also writes the log to log_dir/log.txt."""
        self.close_log()
        self.logger = create_logger(self.env, log_dir)

    def close_log(self) -> None:
        """Closes the log files (the console stays)."""
        for handler in list(self.logger.handlers):
            if isinstance(handler, logging.FileHandler):
                handler.close()
                self.logger.removeHandler(handler)


@contextlib.contextmanager
def bootstrap(opts: RuntimeOptions, *, seed: int | None = None, device: str | None = None,
              log_dir: str | os.PathLike | None = None, timeout_minutes: float = 30.0) -> Iterator[Runtime]:
    """Starts the process (distributed under torchrun), yields its Runtime, and tears it down.

    Args:
        opts: device, precision and TF32.
        seed: seeds torch's global generator on every rank alike (initialisations are then a function of
            the seed; per-step and per-image draws have generators of their own).
        device: overrides opts.device (e.g. "cpu" for work that needs no GPU).
        log_dir: where rank 0 writes log.txt (else stdout only).
        timeout_minutes: how long collectives wait for a slow rank before failing.
    """
    env = init_distributed(device or opts.device, timeout_minutes=timeout_minutes)
    rt = None
    try:
        if opts.tf32:
            enable_tf32()
        if seed is not None:
            torch.manual_seed(seed)
        rt = Runtime(env=env, precision=resolve_precision(opts.precision, env.device),
                     logger=create_logger(env, log_dir))
        yield rt
    finally:
        if rt is not None:
            rt.close_log()
        cleanup()
