"""The Gaussian diffusion of DiT (ADM / IDDPM) as a noise process.

Training draws an integer timestep uniformly below the step count and the noise; the loss is the
hybrid loss (noise MSE plus the VB term for a learned variance). Distillation compares the noise
predictions (MSE) and, with learned variances, the Gaussians p(x_{t-1} | x_t) of student and teacher.
Samplers: ancestral DDPM and DDIM (eta 0) on the respaced schedule (the official loops), and diffusers'
schedulers through one loop (`DIFFUSERS_SAMPLERS`): DPM-Solver++ 2M and its SDE variant, UniPC, Euler
ancestral and DDIM.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
from tqdm.auto import tqdm

from diffusion import create_diffusion
from diffusion.losses import mean_flat, normal_kl
from tinyfusion.errors import UserError

from .base import Cond, Draws, NoiseProcess, Prediction, SweepPoint, TimeDomain, counted, register_process


class GaussianProcess(NoiseProcess):
    """DiT's diffusion: `create_diffusion("", ...)` for training, respaced copies for sampling.

    Args:
        noise_schedule: "linear" (DiT) or "cosine" (IDDPM, MAR's DiffLoss).
        diffusion_steps: steps of the process (DiT: 1000).
        learn_sigma: the model also outputs the variance interpolation (DiT: True).
        predict_xstart, sigma_small, use_kl, rescale_learned_sigmas: as `diffusion.create_diffusion`.
    """

    name = "gaussian"
    samplers = ("ddpm", "ddim", "dpm++", "dpm++-sde", "unipc", "euler-a", "ddim-hf")
    # The official loops: DiT's 250 steps. The multistep solvers are second order and need few steps (20 for
    # DPM-Solver++ 2M and UniPC, as diffusers' pipelines use; 25 for the SDE variant, whose injected noise
    # costs accuracy per step); the first-order ones (diffusers' DDIM, Euler ancestral): 50, DiT's DDIM count.
    default_steps = {"ddpm": 250, "ddim": 250, "dpm++": 20, "dpm++-sde": 25, "unipc": 20, "euler-a": 50,
                     "ddim-hf": 50}

    def __init__(self, noise_schedule: str = "linear", diffusion_steps: int = 1000, learn_sigma: bool = True,
                 predict_xstart: bool = False, sigma_small: bool = False, use_kl: bool = False,
                 rescale_learned_sigmas: bool = False):
        if noise_schedule not in ("linear", "cosine"):
            raise UserError(f"noise_schedule must be 'linear' or 'cosine', got {noise_schedule!r}")
        if diffusion_steps < 1:
            raise UserError(f"diffusion_steps must be at least 1, got {diffusion_steps}")
        self.settings = dict(noise_schedule=noise_schedule, diffusion_steps=int(diffusion_steps),
                             learn_sigma=bool(learn_sigma), predict_xstart=bool(predict_xstart),
                             sigma_small=bool(sigma_small), use_kl=bool(use_kl),
                             rescale_learned_sigmas=bool(rescale_learned_sigmas))
        self.diffusion = self._diffusion("")

    def _diffusion(self, respacing: str):
        return create_diffusion(respacing, **self.settings)

    def record(self) -> dict:
        return {"name": self.name, **self.settings}

    # ------------------------------------------------------------------ diffusers' schedulers

    def diffusers_schedule(self) -> dict:
        """This process as diffusers' schedulers take it: the step count, the betas by name (DiT's linear schedule,
        scaled as ADM scales it for other step counts; IDDPM's cosine, diffusers' "squaredcos_cap_v2", max beta
        0.999) and what the model predicts (the noise, or x_0)."""
        steps = self.settings["diffusion_steps"]
        if self.settings["noise_schedule"] == "linear":
            scale = 1000 / steps
            schedule = dict(beta_schedule="linear", beta_start=scale * 0.0001, beta_end=scale * 0.02)
        else:
            schedule = dict(beta_schedule="squaredcos_cap_v2")
        return dict(num_train_timesteps=steps,
                    prediction_type="sample" if self.settings["predict_xstart"] else "epsilon", **schedule)

    @classmethod
    def from_diffusers_schedule(cls, config: dict, learn_sigma: bool, source: str) -> "GaussianProcess":
        """The process of a diffusers scheduler config (the inverse of `diffusers_schedule`; diffusers' defaults for
        what the config leaves out).

        Raises:
            UserError: betas or a prediction this process does not have (`source` names the config).
        """
        steps = int(config.get("num_train_timesteps", 1000))
        prediction = config.get("prediction_type", "epsilon")
        if prediction not in ("epsilon", "sample"):
            raise UserError(f"{source}: the scheduler's prediction_type {prediction!r} is not one of the Gaussian "
                             "process's (epsilon: the noise, sample: x_0)")
        if config.get("trained_betas") is not None:
            raise UserError(f"{source}: the scheduler holds its own betas (trained_betas), which no named schedule of "
                             "the Gaussian process reproduces (DiT's linear, IDDPM's cosine)")
        schedule = config.get("beta_schedule", "linear")
        if schedule == "linear":
            expected = cls(diffusion_steps=steps).diffusers_schedule()
            start, end = float(config.get("beta_start", 0.0001)), float(config.get("beta_end", 0.02))
            if not (math.isclose(start, expected["beta_start"], rel_tol=1e-9)
                    and math.isclose(end, expected["beta_end"], rel_tol=1e-9)):
                raise UserError(f"{source}: linear betas from {start:g} to {end:g} over {steps} steps are not DiT's "
                                 f"schedule ({expected['beta_start']:g} to {expected['beta_end']:g}), the linear "
                                 "schedule of the Gaussian process")
            noise_schedule = "linear"
        elif schedule == "squaredcos_cap_v2":
            noise_schedule = "cosine"
        else:
            raise UserError(f"{source}: the beta schedule {schedule!r} is not one of the Gaussian process's (DiT's "
                             "linear and IDDPM's cosine: diffusers' linear and squaredcos_cap_v2)")
        return cls(noise_schedule=noise_schedule, diffusion_steps=steps, learn_sigma=learn_sigma,
                   predict_xstart=prediction == "sample")

    def time_domain(self) -> TimeDomain:
        return TimeDomain("discrete", steps=self.settings["diffusion_steps"])

    # ------------------------------------------------------------------ training

    def draw(self, generator: torch.Generator, batch_size: int, shape: Sequence[int], device: torch.device) -> Draws:
        t = torch.randint(0, self.diffusion.num_timesteps, (batch_size,), generator=generator, device=device)
        noise = torch.randn((batch_size, *shape), generator=generator, device=device)
        return {"t": t, "noise": noise}

    def model_input(self, x: torch.Tensor, draws: Draws) -> tuple[torch.Tensor, torch.Tensor]:
        return self.diffusion.q_sample(x, draws["t"], noise=draws["noise"]), draws["t"]

    def losses(self, prediction: Prediction, x: torch.Tensor, draws: Draws) -> dict[str, torch.Tensor]:
        d = self.diffusion
        if d.loss_type.is_vb():
            out = prediction.output
            loss = d._vb_terms_bpd(lambda *a, r=out: r, x, prediction.x_t, prediction.t, clip_denoised=False)["output"]
            return {"loss": loss * d.num_timesteps if self.settings["use_kl"] else loss}
        return d.losses_from_output(prediction.output, x, prediction.x_t, prediction.t, draws["noise"])

    # ------------------------------------------------------------------ calibration over time

    def calibration_times(self) -> torch.Tensor:
        """Every training step from the data end: t = 0, 1, ..., steps - 1."""
        return torch.arange(self.settings["diffusion_steps"])

    def with_time(self, draws: Draws, t: torch.Tensor | float) -> Draws:
        return {**draws, "t": torch.full_like(draws["t"], int(t))}

    def calibration_loss(self, prediction: Prediction, x: torch.Tensor, draws: Draws) -> torch.Tensor:
        """The MSE of the predicted noise (the first C channels of a learned-sigma model) against the drawn
        noise (Diff-Pruning's loss; against x for an x_0-predicting model), without the variance's VB term."""
        target = x if self.settings["predict_xstart"] else draws["noise"]
        return mean_flat((prediction.output[:, :x.shape[1]].float() - target.float()) ** 2)

    def distillation_loss(self, student: Prediction, teacher: Prediction) -> torch.Tensor:
        """MSE between the predicted noise; with learned variances plus KL(teacher || student) of their
        Gaussians p(x_{t-1} | x_t) in bits, where (as in the hybrid loss) the KL term trains only the
        student's variance output: the mean is matched by the MSE."""
        x_t, t = student.x_t, student.t
        channels = x_t.shape[1]
        teacher_out = teacher.output.detach().float()
        student_out = student.output.float()
        loss = mean_flat((student_out[:, :channels] - teacher_out[:, :channels]) ** 2)
        if student_out.shape[1] == 2 * channels:
            frozen = torch.cat([student_out[:, :channels].detach(), student_out[:, channels:]], dim=1)
            p_student = self.diffusion.p_mean_variance(lambda *a, r=frozen: r, x_t, t, clip_denoised=False)
            p_teacher = self.diffusion.p_mean_variance(lambda *a, r=teacher_out: r, x_t, t, clip_denoised=False)
            kl = normal_kl(p_teacher["mean"], p_teacher["log_variance"], p_student["mean"], p_student["log_variance"])
            loss = loss + mean_flat(kl) / math.log(2.0)
        return loss

    # ------------------------------------------------------------------ sampling

    def check_sampler(self, sampler: str, num_steps: int) -> None:
        super().check_sampler(sampler, num_steps)
        steps = self.settings["diffusion_steps"]
        if num_steps > steps:
            raise UserError(f"--num-sampling-steps must be between 1 and {steps} (the training steps it is "
                             f"respaced from), got {num_steps}")

    def sample(self, denoise: Callable, noise: torch.Tensor, cond: Cond, *, sampler: str, num_steps: int,
               generators: Sequence[torch.Generator], progress: bool = False,
               options: dict | None = None) -> torch.Tensor:
        self.check_sampler(sampler, num_steps)
        self.resolve_options(sampler, options)  # the Gaussian samplers take none: refuses any given
        denoise, calls = counted(denoise)
        if sampler in DIFFUSERS_SAMPLERS:
            samples = self._diffusers_loop(sampler, denoise, noise, cond, num_steps, generators, progress)
        else:
            diffusion = self._diffusion(str(num_steps))
            loop = diffusion.p_sample_loop if sampler == "ddpm" else diffusion.ddim_sample_loop
            # No clipping of the predicted x_0, as in DiT's sampling scripts: latents are not bounded to [-1, 1].
            samples = loop(denoise, tuple(noise.shape), noise=noise, clip_denoised=False, model_kwargs=cond,
                           device=noise.device, progress=progress, generator=list(generators))
        self.last_nfe = torch.full((len(noise),), calls[0], dtype=torch.long)
        return samples

    def evaluation_sweep(self, evaluations: Sequence[int], data_shape: Sequence[int]) -> list[SweepPoint]:
        """Every sampler at each count up to the training steps: each makes one evaluation per step (the
        multistep solvers reuse the previous steps' outputs)."""
        steps = self.settings["diffusion_steps"]
        return [SweepPoint(s, s, n, {}, n) for s in self.samplers for n in evaluations if n <= steps]

    def diffusers_scheduler(self, sampler: str):
        """The diffusers scheduler of `sampler` (one of `DIFFUSERS_SAMPLERS`) on this process's schedule."""
        import diffusers

        if self.settings["predict_xstart"]:
            raise UserError(f"--sampler {sampler} is implemented for noise-predicting models; use ddpm or ddim")
        if self.settings["noise_schedule"] == "linear":  # DiT's linear schedule, epsilon prediction
            schedule = self.diffusers_schedule()
        else:  # the float64 betas of the cosine schedule, exactly
            schedule = dict(num_train_timesteps=self.settings["diffusion_steps"], prediction_type="epsilon",
                            trained_betas=self.diffusion.betas.tolist())
        name, settings = DIFFUSERS_SAMPLERS[sampler]
        return getattr(diffusers, name)(**settings, **schedule)

    def _diffusers_loop(self, sampler: str, denoise: Callable, noise: torch.Tensor, cond: Cond, num_steps: int,
                        generators: Sequence[torch.Generator], progress: bool) -> torch.Tensor:
        """Any of diffusers' schedulers on this schedule: the loop of diffusers' pipelines. The stochastic ones
        draw row i's step noise from generators[i] (diffusers' `randn_tensor` takes one generator per row, and
        the sampler sees one row per image: guidance doubles the batch inside `denoise`)."""
        scheduler = self.diffusers_scheduler(sampler)
        scheduler.set_timesteps(num_steps, device=noise.device)
        stochastic = {"generator": list(generators)} if sampler in STOCHASTIC_SAMPLERS else {}
        x = noise * scheduler.init_noise_sigma
        channels = noise.shape[1]
        for t in tqdm(scheduler.timesteps, desc="sampling", leave=False, disable=not progress):
            # Euler's timesteps may fall between integers: the model then sees the float time.
            time = int(t) if float(t).is_integer() else float(t)
            timesteps = torch.full((len(x),), time, device=x.device,
                                   dtype=torch.long if isinstance(time, int) else torch.float32)
            # With a learned variance the model outputs 2C channels; the schedulers need the noise (the first C).
            eps = denoise(scheduler.scale_model_input(x, t), timesteps, **cond)[:, :channels]
            x = scheduler.step(eps, t, x, **stochastic).prev_sample
        return x


# --sampler name -> (diffusers scheduler class, its settings). clip_sample off as in DiT's loops: latents are not
# bounded to [-1, 1]; DDIM with eta 0 and the final step to alpha_bar = 1, as the official DDIM ends.
DIFFUSERS_SAMPLERS = {
    "dpm++": ("DPMSolverMultistepScheduler", dict(algorithm_type="dpmsolver++")),
    "dpm++-sde": ("DPMSolverMultistepScheduler", dict(algorithm_type="sde-dpmsolver++")),
    "unipc": ("UniPCMultistepScheduler", {}),
    "euler-a": ("EulerAncestralDiscreteScheduler", {}),
    "ddim-hf": ("DDIMScheduler", dict(clip_sample=False, set_alpha_to_one=True)),
}
STOCHASTIC_SAMPLERS = ("dpm++-sde", "euler-a")


register_process(GaussianProcess.name, GaussianProcess)
