"""ADM / DiT Gaussian diffusion, written for this toolkit; `create_diffusion` is DiT's entry point."""

from __future__ import annotations

from . import gaussian_diffusion as gd
from .respace import SpacedDiffusion, space_timesteps


def create_diffusion(
    timestep_respacing,
    noise_schedule: str = "linear",
    use_kl: bool = False,
    sigma_small: bool = False,
    predict_xstart: bool = False,
    learn_sigma: bool = True,
    rescale_learned_sigmas: bool = False,
    diffusion_steps: int = 1000,
) -> SpacedDiffusion:
    """The diffusion DiT trains and samples with.

    Args:
        timestep_respacing: "" or None for every step (training), else a respacing spec such as
            "250", "ddim50" or "10,10,10" (see `space_timesteps`).
        noise_schedule: "linear" (DiT) or "cosine".
        use_kl: train on the variational bound instead of the hybrid loss.
        sigma_small: with fixed variances, use the posterior variance instead of beta_t.
        predict_xstart: the model predicts x_0 instead of the noise.
        learn_sigma: the model also outputs the variance interpolation (IDDPM).
        rescale_learned_sigmas: scale the VB term by num_timesteps / 1000.
        diffusion_steps: number of steps of the underlying process.
    """
    betas = gd.get_named_beta_schedule(noise_schedule, diffusion_steps)
    if use_kl:
        loss_type = gd.LossType.RESCALED_KL
    elif rescale_learned_sigmas:
        loss_type = gd.LossType.RESCALED_MSE
    else:
        loss_type = gd.LossType.MSE
    if timestep_respacing is None or timestep_respacing == "":
        timestep_respacing = [diffusion_steps]
    if learn_sigma:
        var_type = gd.ModelVarType.LEARNED_RANGE
    else:
        var_type = gd.ModelVarType.FIXED_SMALL if sigma_small else gd.ModelVarType.FIXED_LARGE
    return SpacedDiffusion(
        use_timesteps=space_timesteps(diffusion_steps, timestep_respacing),
        betas=betas,
        model_mean_type=gd.ModelMeanType.START_X if predict_xstart else gd.ModelMeanType.EPSILON,
        model_var_type=var_type,
        loss_type=loss_type,
    )


__all__ = ["SpacedDiffusion", "create_diffusion", "gd", "space_timesteps"]
