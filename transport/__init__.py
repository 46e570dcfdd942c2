"""SiT's transport (Ma et al. 2024): interpolant paths, training losses, and ODE / SDE samplers.

Convention: x0 is noise, x1 is data, t runs over [0, 1] and t = 1 is data. `create_transport` is the
entry point, as in the official code:

    transport = create_transport("Linear", "velocity")
    loss = transport.training_losses(model, x1, dict(y=y))["loss"].mean()
    sample_fn = Sampler(transport).sample_ode(sampling_method="dopri5")
    samples = sample_fn(torch.randn_like(x1), model, y=y)[-1]
"""

from __future__ import annotations

from .path import DIFFUSION_FORMS, GVPCPlan, ICPlan, VPCPlan
from .transport import ModelType, PathType, Sampler, Transport, WeightType

PREDICTIONS = {"velocity": ModelType.VELOCITY, "score": ModelType.SCORE, "noise": ModelType.NOISE}
PATH_TYPES = {"Linear": PathType.LINEAR, "GVP": PathType.GVP, "VP": PathType.VP}
LOSS_WEIGHTS = {None: WeightType.NONE, "velocity": WeightType.VELOCITY, "likelihood": WeightType.LIKELIHOOD}


def create_transport(path_type: str = "Linear", prediction: str = "velocity", loss_weight: str | None = None,
                     train_eps: float | None = None, sample_eps: float | None = None) -> Transport:
    """A transport with the official defaults.

    Args:
        path_type: "Linear", "GVP" or "VP".
        prediction: what the model predicts: "velocity", "score" or "noise".
        loss_weight: weighting of the score / noise losses: None, "velocity" or "likelihood".
        train_eps, sample_eps: distances kept from the singular ends of the time interval (see
            `Transport.check_interval`). When None, the official defaults: VP 1e-5 (training) and
            1e-3 (sampling); Linear and GVP with score or noise prediction 1e-3 and 1e-3; Linear and
            GVP with velocity prediction 0 and 0 (stable everywhere). Unlike the official code, a
            value given here is always used (it ignores them for velocity prediction, which makes the
            SBDM SDE start at the singular t = 0), and sample_eps defaults on its own.
    """
    for value, choices, what in ((path_type, PATH_TYPES, "path type"), (prediction, PREDICTIONS, "prediction"),
                                 (loss_weight, LOSS_WEIGHTS, "loss weight")):
        if value not in choices:
            raise ValueError(f"unknown {what} {value!r}; choose one of: {', '.join(map(str, choices))}")
    model_type, kind = PREDICTIONS[prediction], PATH_TYPES[path_type]
    if kind == PathType.VP:
        default_train, default_sample = 1e-5, 1e-3
    elif model_type != ModelType.VELOCITY:
        default_train, default_sample = 1e-3, 1e-3
    else:
        default_train, default_sample = 0.0, 0.0
    return Transport(
        model_type=model_type, path_type=kind, loss_type=LOSS_WEIGHTS[loss_weight],
        train_eps=default_train if train_eps is None else train_eps,
        sample_eps=default_sample if sample_eps is None else sample_eps,
    )


__all__ = [
    "DIFFUSION_FORMS", "GVPCPlan", "ICPlan", "LOSS_WEIGHTS", "ModelType", "PATH_TYPES", "PREDICTIONS", "PathType",
    "Sampler", "Transport", "VPCPlan", "WeightType", "create_transport",
]
