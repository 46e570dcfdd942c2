"""The process layer: noise processes behind one protocol (`processes.base.NoiseProcess`).

Only this layer (and the `diffusion` package of the official DiT API it wraps) knows a process's
internals. Everything else builds a process from the record a checkpoint stores, with
`create_process`, and talks to it through the protocol.
"""

from . import flow, gaussian, masked  # noqa: F401  (register "transport", "gaussian", "masked-tokens")
from .base import (
    Cond,
    Draws,
    NoiseProcess,
    Prediction,
    SweepPoint,
    TimeDomain,
    all_samplers,
    create_process,
    process_names,
    register_process,
)
from .flow import TransportProcess
from .gaussian import GaussianProcess
from .masked import MaskedTokenProcess

__all__ = [
    "Cond", "Draws", "GaussianProcess", "MaskedTokenProcess",
    "NoiseProcess", "Prediction", "SweepPoint", "TimeDomain", "TransportProcess", "all_samplers",
    "create_process", "process_names", "register_process",
]
