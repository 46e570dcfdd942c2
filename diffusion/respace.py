"""Timestep respacing (IDDPM section 4): sampling with a subset of the training timesteps."""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np
import torch

from .gaussian_diffusion import GaussianDiffusion


def space_timesteps(num_timesteps: int, section_counts: str | Sequence[int]) -> set[int]:
    """The timesteps to keep out of `num_timesteps`.

    `section_counts` splits the process into equal sections and takes that many evenly strided
    steps from each: "10,15,20" takes 10 from the first third, 15 from the second, 20 from the
    last; "250" is one section. "ddimN" takes the fixed integer stride that gives N steps, as
    in the DDIM paper.
    Raises:
        ValueError: a count that a section cannot supply, or an unreadable spec.
    """
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            desired = _int(section_counts[len("ddim"):], section_counts)
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == desired:
                    return set(range(0, num_timesteps, stride))
            raise ValueError(f"cannot take exactly {desired} steps with an integer stride from "
                             f"{num_timesteps}; use a plain count such as '{desired}' instead of 'ddim{desired}'")
        section_counts = [_int(x, section_counts) for x in section_counts.split(",")]
    section_counts = list(section_counts)
    size_per, extra = divmod(num_timesteps, len(section_counts))
    start_idx, all_steps = 0, []
    for i, section_count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        if not 1 <= section_count <= size:
            raise ValueError(f"section {i} has {size} steps and cannot be respaced to {section_count}")
        frac_stride = 1 if section_count <= 1 else (size - 1) / (section_count - 1)
        cur_idx = 0.0
        for _ in range(section_count):
            all_steps.append(start_idx + round(cur_idx))
            cur_idx += frac_stride
        start_idx += size
    return set(all_steps)


def _int(text: str, spec: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"cannot read the timestep respacing {spec!r}: write a count such as '250', "
                         "section counts such as '10,10,10', or 'ddim50'") from None


class SpacedDiffusion(GaussianDiffusion):
    """A diffusion over a subset of the base process's timesteps.

    The betas are recomputed so that alpha-bar at the kept steps is unchanged; the model sees the
    original timestep of each step (step indices are mapped for it).

    Args:
        use_timesteps: the kept timesteps of the base process.
        **kwargs: the base process's GaussianDiffusion arguments.
    """

    def __init__(self, use_timesteps: Iterable[int], **kwargs):
        self.use_timesteps = set(use_timesteps)
        self.original_num_steps = len(kwargs["betas"])
        base = GaussianDiffusion(**kwargs)
        last_alpha_cumprod, new_betas, self.timestep_map = 1.0, [], []
        for i, alpha_cumprod in enumerate(base.alphas_cumprod):
            if i in self.use_timesteps:
                new_betas.append(1 - alpha_cumprod / last_alpha_cumprod)
                last_alpha_cumprod = alpha_cumprod
                self.timestep_map.append(i)
        kwargs["betas"] = np.array(new_betas)
        super().__init__(**kwargs)

    def p_mean_variance(self, model, *args, **kwargs):
        return super().p_mean_variance(self._wrap_model(model), *args, **kwargs)

    def training_losses(self, model, *args, **kwargs):
        return super().training_losses(self._wrap_model(model), *args, **kwargs)

    def _wrap_model(self, model):
        if isinstance(model, _TimestepMappedModel):
            return model
        return _TimestepMappedModel(model, self.timestep_map)


class _TimestepMappedModel:
    """Calls the model with original timesteps in place of respaced step indices."""

    def __init__(self, model, timestep_map: list[int]):
        self.model = model
        self.timestep_map = timestep_map

    def __call__(self, x, ts, **kwargs):
        map_tensor = torch.tensor(self.timestep_map, device=ts.device, dtype=ts.dtype)
        return self.model(x, map_tensor[ts], **kwargs)
