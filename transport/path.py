"""Interpolant paths ("coupling plans") of SiT: x_t = alpha_t * x1 + sigma_t * x0.

x0 is Gaussian noise, x1 is data, and t runs from 0 (noise) to 1 (data). A path is its two
coefficients and their time derivatives; everything else (the training target u_t, the drift of the
probability-flow ODE, the conversions between velocity, score and noise) follows from them
(SiT, section 2 and appendix A; Albergo et al., "Stochastic Interpolants", 2023).

Every method takes t as an (N,) tensor and the data as (N, ...) tensors; coefficients come back
shaped (N, 1, ..., 1) so that they broadcast over the data.
"""

from __future__ import annotations

import math

import torch


def expand_t_like_x(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(N,) times to (N, 1, ..., 1), broadcastable against x (N, ...)."""
    return t.reshape(t.shape[0], *([1] * (x.dim() - 1)))


class ICPlan:
    """The linear path ("Linear"): alpha_t = t, sigma_t = 1 - t (rectified flow)."""

    def compute_alpha_t(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The data coefficient alpha_t and its derivative."""
        return t, torch.ones_like(t)

    def compute_sigma_t(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The noise coefficient sigma_t and its derivative."""
        return 1 - t, -torch.ones_like(t)

    def compute_d_alpha_alpha_ratio_t(self, t: torch.Tensor) -> torch.Tensor:
        """d alpha_t / alpha_t, in the form that is best conditioned for the path."""
        return 1 / t

    def compute_drift(self, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The probability-flow drift written in the score: v(x, t) = -drift_mean + drift_var * score.

        drift_mean = -(alpha'/alpha) x and drift_var = (alpha'/alpha) sigma^2 - sigma sigma'
        (SiT eq. 54 with the velocity-score relation of the interpolant).
        Returns:
            drift_mean (N, ...) and drift_var (N, 1, ..., 1).
        """
        t = expand_t_like_x(t, x)
        ratio = self.compute_d_alpha_alpha_ratio_t(t)
        sigma_t, d_sigma_t = self.compute_sigma_t(t)
        return -ratio * x, ratio * sigma_t ** 2 - sigma_t * d_sigma_t

    def compute_diffusion(self, x: torch.Tensor, t: torch.Tensor, form: str = "constant",
                          norm: float = 1.0) -> torch.Tensor:
        """The diffusion coefficient w_t of the sampling SDE (SiT section 3.3), (N, 1, ..., 1).

        Forms: "constant" (norm), "SBDM" (norm * drift_var: the reverse SDE of score-based diffusion),
        "sigma" (norm * sigma_t), "linear" (norm * (1 - t)), "decreasing" (0.25 (norm cos(pi t) + 1)^2),
        "increasing-decreasing" (norm sin(pi t)^2).
        """
        if form == "SBDM":
            return norm * self.compute_drift(x, t)[1]
        t = expand_t_like_x(t, x)
        if form == "constant":
            return torch.full_like(t, norm)
        if form == "sigma":
            return norm * self.compute_sigma_t(t)[0]
        if form == "linear":
            return norm * (1 - t)
        if form == "decreasing":
            return 0.25 * (norm * torch.cos(math.pi * t) + 1) ** 2
        if form == "increasing-decreasing":
            return norm * torch.sin(math.pi * t) ** 2
        raise ValueError(f"unknown diffusion form {form!r}; choose one of: {', '.join(DIFFUSION_FORMS)}")

    def get_score_from_velocity(self, velocity: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The score grad log p_t(x) from a velocity prediction (SiT eq. 55)."""
        t = expand_t_like_x(t, x)
        alpha_t, d_alpha_t = self.compute_alpha_t(t)
        sigma_t, d_sigma_t = self.compute_sigma_t(t)
        inv_ratio = alpha_t / d_alpha_t  # alpha / alpha'
        var = sigma_t ** 2 - inv_ratio * d_sigma_t * sigma_t
        return (inv_ratio * velocity - x) / var

    def get_noise_from_velocity(self, velocity: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The noise x0 from a velocity prediction: solve x = alpha x1 + sigma x0, v = alpha' x1 + sigma' x0."""
        t = expand_t_like_x(t, x)
        alpha_t, d_alpha_t = self.compute_alpha_t(t)
        sigma_t, d_sigma_t = self.compute_sigma_t(t)
        inv_ratio = alpha_t / d_alpha_t
        return (inv_ratio * velocity - x) / (inv_ratio * d_sigma_t - sigma_t)

    def get_velocity_from_score(self, score: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The velocity from a score prediction (SiT eq. 54)."""
        drift_mean, drift_var = self.compute_drift(x, t)
        return drift_var * score - drift_mean

    def compute_mu_t(self, t: torch.Tensor, x0: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
        """alpha_t x1 + sigma_t x0, (N, ...)."""
        t = expand_t_like_x(t, x1)
        return self.compute_alpha_t(t)[0] * x1 + self.compute_sigma_t(t)[0] * x0

    def compute_xt(self, t: torch.Tensor, x0: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
        """The point x_t of the path between noise x0 and data x1 (deterministic given both)."""
        return self.compute_mu_t(t, x0, x1)

    def compute_ut(self, t: torch.Tensor, x0: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
        """The conditional velocity u_t = alpha'_t x1 + sigma'_t x0 (SiT eq. 47): the training target."""
        t = expand_t_like_x(t, x1)
        return self.compute_alpha_t(t)[1] * x1 + self.compute_sigma_t(t)[1] * x0

    def plan(self, t: torch.Tensor, x0: torch.Tensor, x1: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(t, x_t, u_t) for times t (N,), noise x0 and data x1 (N, ...)."""
        return t, self.compute_xt(t, x0, x1), self.compute_ut(t, x0, x1)


class VPCPlan(ICPlan):
    """The variance-preserving path ("VP") of score-based diffusion (Song et al. 2021), in SiT's time.

    With s = 1 - t the diffusion time and beta(s) linear from `sigma_min` (0.1) to `sigma_max` (20),
    alpha_t = exp(-1/4 s^2 (beta_max - beta_min) - 1/2 s beta_min) and sigma_t = sqrt(1 - alpha_t^2).
    sigma_t vanishes at t = 1, which is why VP trains and samples short of it.
    """

    def __init__(self, sigma_min: float = 0.1, sigma_max: float = 20.0):
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max

    def log_mean_coeff(self, t: torch.Tensor) -> torch.Tensor:
        """log alpha_t."""
        s = 1 - t
        return -0.25 * s ** 2 * (self.sigma_max - self.sigma_min) - 0.5 * s * self.sigma_min

    def d_log_mean_coeff(self, t: torch.Tensor) -> torch.Tensor:
        """d log alpha_t / dt = beta(1 - t) / 2."""
        return 0.5 * (1 - t) * (self.sigma_max - self.sigma_min) + 0.5 * self.sigma_min

    def compute_alpha_t(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        alpha_t = torch.exp(self.log_mean_coeff(t))
        return alpha_t, alpha_t * self.d_log_mean_coeff(t)

    def compute_sigma_t(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        log_alpha2 = 2 * self.log_mean_coeff(t)
        # 1 - alpha^2 through expm1: near t = 1 it is about 1e-6 and 1 - exp() would lose most digits.
        sigma_t = torch.sqrt(-torch.expm1(log_alpha2))
        return sigma_t, -torch.exp(log_alpha2) * self.d_log_mean_coeff(t) / sigma_t

    def compute_d_alpha_alpha_ratio_t(self, t: torch.Tensor) -> torch.Tensor:
        return self.d_log_mean_coeff(t)

    def compute_drift(self, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The VP SDE's own drift: -beta/2 x and beta/2 (the general formula, simplified exactly)."""
        t = expand_t_like_x(t, x)
        beta_t = self.sigma_min + (1 - t) * (self.sigma_max - self.sigma_min)
        return -0.5 * beta_t * x, beta_t / 2


class GVPCPlan(ICPlan):
    """The generalised variance-preserving path ("GVP"): alpha_t = sin(pi t / 2), sigma_t = cos(pi t / 2)."""

    def compute_alpha_t(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.sin(t * math.pi / 2), math.pi / 2 * torch.cos(t * math.pi / 2)

    def compute_sigma_t(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.cos(t * math.pi / 2), -math.pi / 2 * torch.sin(t * math.pi / 2)

    def compute_d_alpha_alpha_ratio_t(self, t: torch.Tensor) -> torch.Tensor:
        return math.pi / (2 * torch.tan(t * math.pi / 2))


DIFFUSION_FORMS = ("constant", "SBDM", "sigma", "linear", "decreasing", "increasing-decreasing")
