"""The whole TinyFusion pipeline on a built-in dataset, through the real scripts (quickstart.py).

A stand-in for the real job that runs on a laptop CPU: scikit-learn's 8x8 handwritten digits
(or a user's image folder) in pixel space, a small DiT trained from scratch as the "pretrained"
teacher, pruning to half depth by every depth method of the toolkit and to half of every block's heads and
MLP channels by Diff-Pruning (DiT, SiT), the same recovery budget for each,
sampling and scoring. Inception features mean nothing on 8x8 digits, so FID is computed in the
feature space of a small digits classifier and labelled as such; the two halves of the real
digits scored against each other give the floor.

With --clear (DiT, SiT), the teacher also gets CLEAR's local attention, distilled on its own samples, as a
row beside the pruned models.

Every step runs a script of the repository as a subprocess (torchrun for the distributed ones),
with its output in OUT/logs/STEP.log; a failing step stops the run with its command and output.
Running again skips the steps whose output exists (the teacher above all) and redoes the rest; the
folder records its settings, and a run with other settings is refused.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor, wait
from functools import partial
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from models import stack_depths, total_depth, unwrap
from models.attention import NO_ATTENTION_KINDS, attention_modules, describe_attention
from tinyfusion import launcher
from tinyfusion.errors import UserError
from tinyfusion.fileio import atomic_write, atomic_write_json, setting_differences
from tinyfusion.options import ScorePruningOptions
from tinyfusion.sampling import save_grid

REPO = Path(__file__).resolve().parents[1]
# The families the quickstart runs (--family): the teacher's registry name and how its samples are drawn.
# DiT: DDIM on the Gaussian diffusion; SiT: Heun on the probability-flow ODE of the Linear velocity
# transport (the same number of grid points; Heun calls the model twice per step).
# MAR: 8 masked iterations for its 16 tokens, each token drawn by 250 steps of the ancestral sampler of its
# diffusion head, guidance on the linear schedule. Measured on the digits teacher: with 50 steps the samples
# saturate (FID 40): the first reverse step from t = 999 (alpha-bar about 2e-9 on the cosine schedule)
# multiplies the small head's noise error by about 650; with 250 steps by far less (FID 3.9). The steps
# cost little next to the iterations: a small MLP on one token.
FAMILIES = {
    "dit": {"teacher": "DiT-Nano/2", "sampler": ["--sampler", "ddim"], "width": True, "clear": True},
    "sit": {"teacher": "SiT-Nano/2", "sampler": ["--sampler", "ode", "--sampling-method", "heun"], "width": True,
            "clear": True},
    "mar": {"teacher": "MAR-Nano", "sampler": ["--sampler", "mar", "--num-iter", "8"], "sampling_steps": 250},
}

TAYLOR_THRESHOLD = ScorePruningOptions.taylor_threshold  # Diff-Pruning's


@dataclasses.dataclass(frozen=True)
class Budget:
    """How much of everything a run does (the default run and --fast)."""

    teacher_steps: int
    teacher_lr: float
    batch_size: int
    prune_steps: int
    recover_steps: int
    recover_lr: float
    num_samples: int  # per model; the same count as the real half they are scored against
    sampling_steps: int
    cfg_scale: float
    classifier_epochs: int
    ema_decay: float
    wide_prune_steps: int  # the cap of TinyFusion's one group over all blocks (C(8,4) = 70 options)
    decision_seeds: int  # every learned decision is made with this many seeds
    fid_seeds: int  # the teacher is sampled with this many seeds: the spread of its FID
    clear_samples: int  # --clear: the teacher's own samples that CLEAR distils on (recorded only with --clear)
    # Diff-Pruning's Taylor loop stops after the first timestep whose loss falls below this fraction of the largest
    # (prune_by_score.py --taylor-threshold; 0.05 is Diff-Pruning's). The smoke run's teacher, 40 steps old, never
    # gets there: all 1000 timesteps, 150 s of the smoke run's 10 minutes on 2 cores; 0.3 stops it after 150.
    taylor_threshold: float


# Measured on 2 CPU cores: what DiT-Nano/2 learns in a fixed time depends on the number of updates
# more than on the batch size: 2000 steps at batch 128 give blotchy digits (classifier-space FID 22,
# precision 0.13), 4000 steps at batch 64 in about the same time clear ones (FID 5.2, precision 0.46,
# against 0.47 and 0.86 for real vs real). DDIM needs no more than 10 steps on it. The recovery budget
# (about 6% of the teacher's steps) is small next to the teacher's training, so recovery cannot pass
# for more training of the teacher.
# TinyFusion's one 4:8 group chooses among C(8, 4) = 70 options where each 1:2 group has 2: measured on an AMD
# EPYC, its EMA confidence was 0.45 after the 300 steps that settle the 1:2 groups, and the last bits of float
# rounding chose the pick. It runs until its decision is confident (every EMA confidence >= STOP_CONFIDENCE and
# the raw gates agree), up to 10x the steps of the 1:2 groups.
STOP_CONFIDENCE = 0.9
DEFAULT = Budget(teacher_steps=4000, teacher_lr=2e-3, batch_size=64, prune_steps=300, recover_steps=250,
                 recover_lr=5e-4, num_samples=898, sampling_steps=10, cfg_scale=2.0, classifier_epochs=10,
                 ema_decay=0.995, wide_prune_steps=3000, decision_seeds=3, fid_seeds=3, clear_samples=2048,
                 taylor_threshold=TAYLOR_THRESHOLD)
FAST = Budget(teacher_steps=40, teacher_lr=2e-3, batch_size=64, prune_steps=8, recover_steps=8,
              recover_lr=5e-4, num_samples=64, sampling_steps=4, cfg_scale=2.0, classifier_epochs=2, ema_decay=0.9,
              wide_prune_steps=16, decision_seeds=2, fid_seeds=2, clear_samples=128, taylor_threshold=0.3)
# The budget fields of the CLEAR stage: a folder records them once it runs the stage (--clear), so a folder made
# before the stage existed, or without --clear, stays valid.
CLEAR_FIELDS = ("clear_samples",)

# The pruning methods compared, at half depth, with the same freedom where it matters: "learned
# 1:2" chooses one block of each pair; "learned 4:8" chooses any half of the blocks, as the
# score baselines do.
METHODS = ("learned-1-2", "learned-4-8", "bi", "loss", "oracle", "random")
# Width pruning beside them, for the families whose blocks it cuts (DiT, SiT): Diff-Pruning's Taylor criterion
# removes half of every block's heads and MLP channels, about half of the blocks' parameters, and gets the same
# recovery budget.
WIDTH_METHODS = ("diff-pruning",)
DEVICES = ("cpu", "cuda")
LAUNCHES = ("fork", "spawn")
DEFAULT_LAUNCH = "fork" if launcher.AVAILABLE else "spawn"
# Scripts that run on the CPU whatever the device (cutting blocks out of a file).
NO_DEVICE_FLAG = ("prune_by_index.py",)
WIDTH_RATIO = 0.5
METHOD_LABELS = {
    "learned-1-2": "TinyFusion, 1:2 groups, full weight updates",
    "learned-4-8": "TinyFusion, one group over all blocks, full weight updates",
    "bi": "ShortGPT block influence", "loss": "loss sensitivity", "oracle": "BK-SDM oracle", "random": "random",
    "diff-pruning": "Diff-Pruning (Taylor over timesteps), half of every block's heads and MLP channels",
}

# CLEAR (--clear): the teacher's attention made local (each token attends to the tokens of the grid closer than r),
# its attention layers distilled with CLEAR's loss (gt + 0.5 pred + 0.5 attn) on the teacher's own samples, for the
# recovery budget of the pruned models, so the ceiling row (the teacher trained as long) is its control too. The
# same conversion with no training (one step at learning rate 0: train_masked_kd.py saves every weight of the
# teacher, with local attention) gives the row's FID before distillation: what distillation buys.
# The samples are drawn as the teacher's FID samples are (sampler, steps, guidance), from a seed no FID set uses;
# the default run draws 2048, about the digits' 1797, so that its 250 steps of 64 see each about 8 times, as the
# recovery runs see the real digits. Measured on the default run's teacher (FID 4.00; 3.24 and 3.63 with the other
# sampling seeds): local r=2 scores 5.00 converted without training and 3.95 distilled (4.56 / 3.29 and 5.25 / 3.80
# with the other seeds). CLEAR's pooled branch (--attention-pool 2: each query also attends to the keys averaged over
# the 2x2 cells of the grid) helps before distillation (4.33) but not after (3.96), and adds keys to every query: off.
CLEAR_SEED_OFFSET = 1000
CLEAR_POOL = 1


def clear_attention(grid: tuple[int, int]) -> dict:
    """The local attention --clear gives a teacher of this token grid: r is a quarter of the grid's shorter side (a
    16x16 grid: 4), and at least 2, the 3x3 neighbourhood (at r <= sqrt(2) a token sees a cross of 5 tokens, at
    r <= 1 itself alone). On the digits' 4x4 grid (8x8 pixels, patches of 2) r = 2: 9 of the 16 tokens at most, 4 at a
    corner."""
    return {"kind": "local", "radius": max(2, min(grid) // 4), "pool": CLEAR_POOL}


def clear_name(spec: dict) -> str:
    """The file and row name of a local attention: local-r2, local-r2-pool2."""
    return f"local-r{spec['radius']:g}" + (f"-pool{spec['pool']}" if spec["pool"] > 1 else "")


# TinyFusion's choices measured against each other (1:2 groups, decisions only; with --exhaustive each pick
# is ranked among every 1:2 pattern): the weight updates (full weights, or LoRA on every Linear as the
# reference, or on the blocks' Linears) and the gate EMA (its window from the run length, or a fixed 0.999,
# whose window of 1000 steps is longer than the run). The quickstart's TinyFusion rows use the first: on
# the digits teacher, full weight updates pick the best of the 16 patterns and LoRA picks the 12th
# (measured with --exhaustive; README). A 0.6M-parameter model makes full updates as cheap as LoRA.
LEARNED_FLAGS = ["--delta-w"]
ABLATIONS = {
    "learned-1-2": ("full weight updates, gate EMA from the run length (the quickstart's setting)", LEARNED_FLAGS),
    "ablation-lora": ("LoRA on every Linear (the reference's), gate EMA from the run length", ["--delta-w", "--lora"]),
    "ablation-lora-blocks": ("LoRA on the blocks' Linears only", ["--delta-w", "--lora", "--lora-targets", "blocks"]),
    "ablation-ema-0.999": ("full weight updates, gate EMA 0.999", [*LEARNED_FLAGS, "--ema-decay", "0.999"]),
}


def one_of_each_pair(depth: int) -> list[list[int]]:
    """Every 1:2 pattern of a model of even depth: one block of each consecutive pair (2^(depth/2) of them)."""
    return [[2 * p + bit for p, bit in enumerate(bits)] for bits in itertools.product((0, 1), repeat=depth // 2)]


def pattern_name(kept: list[int]) -> str:
    return "pattern-" + "-".join(map(str, kept))


class StepFailed(RuntimeError):
    """A pipeline step's script exited with an error."""


#################################################################################
#                                       Data                                    #
#################################################################################

def write_digits(root: Path) -> int:
    """scikit-learn's 8x8 digits as an image folder (RGB PNGs, one folder per digit); returns the count."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    for i, (image, label) in enumerate(zip(digits.images, digits.target)):
        path = root / str(label) / f"{i:04d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        # 17 grey levels (0..16) spread over 0..255
        Image.fromarray((image / 16.0 * 255).round().astype(np.uint8)).convert("RGB").save(path)
    return len(digits.images)


def real_halves(folder: Path, image_size: int, out: Path, seed: int) -> tuple[Path, Path, np.ndarray, np.ndarray]:
    """The real images (center-cropped) split in two random halves, as .npz files and arrays with labels.

    Not `tinyfusion.evaluation.split_halves`: every image is kept, real_a taking the odd one (the published
    floor and every FID of the quickstart are against these halves)."""
    from tinyfusion.images import adm_center_crop, list_image_folder, load_image

    listing = list_image_folder(folder)
    images = np.stack([np.asarray(adm_center_crop(load_image(folder / p), image_size)) for p in listing.paths])
    labels = np.asarray(listing.labels)
    order = np.random.default_rng(seed).permutation(len(images))
    half = (len(images) + 1) // 2
    paths = []
    for name, part in (("real_a", order[:half]), ("real_b", order[half:])):
        path = out / f"{name}.npz"
        atomic_write(path, lambda f, part=part: np.savez(f, arr_0=images[part], arr_1=labels[part]))
        paths.append(path)
    return paths[0], paths[1], images, labels


#################################################################################
#                                     Pipeline                                  #
#################################################################################

class Quickstart:
    """Runs the pipeline into `out`.

    Args:
        out: the output folder (reused by a later run).
        budget: DEFAULT or FAST.
        nproc: processes for the distributed scripts (torchrun); 1 runs them with plain python.
        data_path: an image folder of one's own instead of the digits.
        image_size: the (square) size images are cropped to; the model works in pixel space.
        seed: the global seed of every script.
        family: the teacher's family (FAMILIES).
        exhaustive: also cut, recover and score every 1:2 pattern.
        clear: also give the teacher CLEAR's local attention, distilled on its own samples (DiT, SiT).
        device: "cpu", or "cuda": every script on the GPU, trained and sampled in bf16 (autocast in training, the
            inference path in sampling), the distributed scripts under torchrun even with one process (NCCL).
        launch: how a step that runs as plain python starts: "fork", forked from a process of the run's that has
            imported torch (tinyfusion/launcher.py: the same process, without the 4-5 s of CPU that importing torch
            and ending a process that holds it cost each of the ~70 steps; Linux), or "spawn", a new python process.
            torchrun launches its own processes.
    """

    def __init__(self, out: Path, budget: Budget, nproc: int, data_path: str | None, image_size: int, seed: int,
                 family: str = "dit", exhaustive: bool = False, clear: bool = False, device: str = "cpu",
                 launch: str = DEFAULT_LAUNCH):
        if family not in FAMILIES:
            raise UserError(f"--family {family!r}: choose one of {', '.join(FAMILIES)}")
        if clear and not FAMILIES[family].get("clear"):
            raise UserError(f"--clear gives the teacher local attention, which {FAMILIES[family]['teacher']} has not: "
                             f"{NO_ATTENTION_KINDS}; drop --clear or choose --family dit or sit")
        self.out, self.budget, self.nproc, self.seed = Path(out), budget, nproc, seed
        self.family, self.teacher_model = family, FAMILIES[family]["teacher"]
        self.exhaustive, self.clear = exhaustive, clear
        if device not in DEVICES:
            raise UserError(f"--device {device!r}: choose one of {', '.join(DEVICES)}")
        if device == "cuda" and not torch.cuda.is_available():
            raise UserError("--device cuda: no CUDA GPU is visible to torch here; drop --device cuda (the quickstart "
                             "runs on CPU), or run on a machine with a GPU and a CUDA build of torch")
        self.device = device
        self.precision = "bf16" if device == "cuda" else "fp32"
        if launch not in LAUNCHES:
            raise UserError(f"--launch {launch!r}: choose one of {', '.join(LAUNCHES)}")
        if launch == "fork" and not launcher.AVAILABLE:
            raise UserError(f"--launch fork forks each step from a process that has imported torch, which this "
                             f"platform ({sys.platform}) does not do safely; use --launch spawn")
        self.launch = launch
        self._servers: list[launcher.ForkServer] = []  # one per thread that runs steps (_fork_server)
        self._local = threading.local()
        # The rows' methods: depth pruning to half the blocks, and width pruning where the family allows it.
        self.methods = METHODS + (WIDTH_METHODS if FAMILIES[family].get("width") else ())
        self.data_path, self.image_size = data_path, image_size
        # Wall time of each step, kept across runs: a rerun that reuses the teacher still reports its time.
        self.times_file = self.out / "step_seconds.json"
        self.times: dict[str, float] = json.loads(self.times_file.read_text()) if self.times_file.is_file() else {}
        # Independent steps of a stage run side by side when the cores allow it (e.g. two one-process
        # scripts on two cores); every process gets its share of the cores as threads.
        cores = os.cpu_count() or 1
        # On a GPU the steps side by side share it: a few at a time.
        self.jobs = max(1, cores // nproc) if device == "cpu" else min(4, max(1, cores // nproc))
        self.threads = max(1, cores // (nproc * self.jobs))
        self._lock = threading.Lock()
        self._bar: tqdm | None = None
        # Every step's environment, fixed now: libraries the run imports later add variables of their own to
        # os.environ (scikit-learn's KMP_*), and a step forked from a server must have the server's environment.
        self.env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(self.threads)}

    # ----------------------------------------------------------------- running scripts

    def script(self, name: str, args: list[str], *, distributed: bool, output: Path | None = None) -> None:
        """Runs a repository script as a subprocess, its output in logs/NAME.log; skipped when `output`
        exists already (a rerun), keeping the time recorded when it was made."""
        if output is not None and output.exists():
            self._advance()
            return
        cmd = self.command(args, distributed=distributed)
        log = self.out / "logs" / f"{name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        env = self.env
        with self._lock:
            if self._bar is not None:
                self._bar.set_postfix_str(name)
        start = time.time()
        with open(log, "w") as f:
            f.write("$ " + " ".join(cmd) + "\n")
        if self.launch == "fork" and cmd[1:3] != ["-m", "torch.distributed.run"]:  # torchrun starts its own
            returncode = self._fork_server(env).run(cmd[1:], cwd=REPO, env=env, stdout=log, append=True)
        else:
            with open(log, "a") as f:
                returncode = subprocess.run(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
        seconds = time.time() - start
        if returncode != 0:
            tail = "".join(log.read_text().splitlines(keepends=True)[-40:])
            raise StepFailed(f"step {name!r} failed (exit code {returncode}):\n$ {' '.join(cmd)}\n{tail}\n"
                             f"(full output: {log})")
        with self._lock:
            self.times[name] = seconds
            atomic_write_json(self.times_file, self.times)
        self._advance()

    def _fork_server(self, env: dict[str, str]) -> launcher.ForkServer:
        """The calling thread's fork server (a thread runs one step at a time; `together` runs `jobs` threads)."""
        server = getattr(self._local, "server", None)
        if server is None:
            server = self._local.server = launcher.ForkServer(env, REPO)
            with self._lock:
                self._servers.append(server)
        return server

    def close(self) -> None:
        """Ends the fork servers."""
        for server in self._servers:
            server.close()
        self._servers.clear()

    def command(self, args: list[str], *, distributed: bool) -> list[str]:
        """The command line of a step: torchrun for a distributed script with several processes (on CUDA with one
        too, so NCCL runs), plain python otherwise; on CUDA every script that runs a model gets --device cuda."""
        torchrun = distributed and (self.nproc > 1 or self.device == "cuda")
        launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={self.nproc}"]
                    if torchrun else [sys.executable])
        on_device = self.device != "cpu" and args[0] not in NO_DEVICE_FLAG and "--device" not in args
        return launcher + args + (["--device", self.device] if on_device else [])

    def _advance(self) -> None:
        with self._lock:
            if self._bar is not None:
                self._bar.update(1)

    def together(self, steps: list[Callable[[], Path]]) -> list[Path]:
        """Runs independent steps, `self.jobs` at a time; their results in order. A failure is raised
        once the steps under way have finished."""
        if self.jobs == 1:
            return [step() for step in steps]
        with ThreadPoolExecutor(max_workers=self.jobs) as pool:
            futures = [pool.submit(step) for step in steps]
            wait(futures)
        return [f.result() for f in futures]

    def path(self, *parts: str) -> Path:
        return self.out.joinpath(*parts)

    # ----------------------------------------------------------------- the steps

    def settings(self) -> dict:
        budget = dataclasses.asdict(self.budget)
        clear = {k: budget.pop(k) for k in CLEAR_FIELDS}
        if budget["taylor_threshold"] == TAYLOR_THRESHOLD:
            del budget["taylor_threshold"]  # folders made before the field existed stay valid
        settings = {"budget": budget, "data_path": self.data_path, "image_size": self.image_size, "seed": self.seed,
                    **({"clear": clear} if self.clear else {}),
                    **({"device": self.device} if self.device != "cpu" else {})}  # CPU folders stay valid
        return settings if self.family == "dit" else {**settings, "family": self.family}  # DiT folders stay valid

    def check_folder(self) -> None:
        """Records the run's settings in the folder, or refuses a folder made with other ones. The CLEAR stage's
        settings are compared once the folder has them: a folder made without --clear takes the stage later (every
        other step reused), and a run without --clear leaves the stage's files alone."""
        record = self.out / "quickstart.json"
        current = json.loads(json.dumps(self.settings()))
        if record.is_file():
            recorded = json.loads(record.read_text())
            differences = setting_differences(recorded, current,
                                              ignore=() if "clear" in recorded and "clear" in current else ("clear",))
            if differences:
                raise UserError(f"{self.out} holds a quickstart run with other settings ({'; '.join(differences)}); "
                                 "pass another --out, or delete the folder to start over")
            if "clear" in current and "clear" not in recorded:
                atomic_write_json(record, {**recorded, "clear": current["clear"]})
        else:
            atomic_write_json(record, current)

    def run(self) -> dict:
        # A smoke run checks the ablation stage with one setting; the full run measures them all.
        ablations = [name for name in ABLATIONS if name not in METHODS][:1 if self.budget == FAST else None]
        learned = [m for m in [*METHODS, *ablations] if m.startswith(("learned", "ablation"))]
        other_seeds = [self.seed + k for k in range(1, self.budget.decision_seeds)]
        teacher_seeds = [self.seed + k for k in range(1, self.budget.fid_seeds)]
        methods = self.methods
        steps = (3 + 1 + len(methods) + len(ablations) + len(learned) * len(other_seeds) + (len(methods) + 2)
                 + (2 * len(methods) + 3 + len(teacher_seeds)) + 2 + (5 if self.clear else 0))
        self.out.mkdir(parents=True, exist_ok=True)
        self.check_folder()
        self.started = time.time()
        with tqdm(total=steps, desc="quickstart", unit="step") as self._bar:
            real_a, real_b, classifier = self.prepare_data()
            teacher = self.train_teacher()
            self.stacks = self._teacher_stacks(teacher)
            self.depth = sum(self.stacks.values())
            if self.exhaustive:
                self._bar.total += 3 * len(one_of_each_pair(self.depth))
            pruned = dict(zip([*methods, *ablations],
                              self.together([partial(self.prune, m, teacher) for m in [*methods, *ablations]])))
            # Every learned decision again with other seeds (decisions only): what holds across them is reported.
            reseeded = [(m, seed) for m in learned for seed in other_seeds]
            decisions = {m: [(self.seed, pruned[m])] for m in learned}
            for (m, seed), path in zip(reseeded, self.together([partial(self.prune, m, teacher, seed)
                                                                for m, seed in reseeded])):
                decisions[m].append((seed, path))
            recovery = {f"{m}+kd": partial(self.distill, m, pruned[m], teacher) for m in methods}
            recovery["learned-1-2+ft"] = partial(self.finetune, "learned-1-2", pruned["learned-1-2"])
            recovery["teacher+train"] = partial(self.ceiling, teacher)
            if self.clear:
                self.grid = self._token_grid(teacher)
                self.attention = clear_attention(self.grid)
                tqdm.write(f"CLEAR: the teacher's token grid is {'x'.join(map(str, self.grid))}; local attention "
                           f"{describe_attention(self.attention)}")
                data = self.self_generated(teacher)
                name = clear_name(self.attention)
                recovery[name] = partial(self.distill_local, teacher, data, self.attention, trained=False)
                recovery[f"{name}+clear"] = partial(self.distill_local, teacher, data, self.attention)
            recovered = dict(zip(recovery, self.together(list(recovery.values()))))
            models = {"teacher": teacher, "teacher+train": recovered.pop("teacher+train"),
                      **{m: pruned[m] for m in methods}, **recovered}
            samples = dict(zip(models, self.together([partial(self.sample, n, c) for n, c in models.items()])))
            # The teacher sampled with other seeds: how far FID moves with the sampling noise alone.
            spread = {f"teacher-seed{seed}": partial(self.sample, f"teacher-seed{seed}", teacher, seed)
                      for seed in teacher_seeds}
            samples.update(zip(spread, self.together(list(spread.values()))))
            if self.exhaustive:
                samples.update(self.every_pattern(teacher))
            fid = self.score(real_a, real_b, samples, classifier)
            latency = self.measure_latency(models, ["teacher", *methods,
                                                    *([clear_name(self.attention)] if self.clear else [])])
        self._bar = None
        if self.budget == FAST:
            atomic_write(self.path("grids", "SMOKE-RUN.txt"), lambda f: f.write(
                b"These grids come from a --fast smoke run: tiny budgets, so they are mostly noise and say nothing "
                b"about the methods. Run quickstart.py without --fast for real samples.\n"))
        return self.report(models, fid, latency, pruned, decisions)

    @staticmethod
    def _teacher_stacks(teacher: Path) -> dict[str, int]:
        from tinyfusion.checkpoint import load_model

        return stack_depths(load_model(teacher).model)

    @staticmethod
    def _token_grid(teacher: Path) -> tuple[int, int]:
        """(rows, columns) of the teacher's token grid, what local attention's radius is measured on."""
        from tinyfusion.checkpoint import load_model

        return attention_modules(unwrap(load_model(teacher).model))[0].grid

    def half_depth(self) -> list[str]:
        """--target-depth of the score baselines: half of the blocks, per stack for a model of several (MAR's
        encoder and decoder each keep half, as TinyMAR-D16 and the 1:2 groups do)."""
        if len(self.stacks) == 1:
            return [str(self.depth // 2)]
        return [f"{name}={depth // 2}" for name, depth in self.stacks.items()]

    def every_pattern(self, teacher: Path) -> dict[str, Path]:
        """--exhaustive: every 1:2 pattern cut from the teacher, recovered with the same budget, sampled."""
        patterns = one_of_each_pair(self.depth)
        cut = self.together([partial(self.cut, kept, teacher) for kept in patterns])
        names = [pattern_name(kept) for kept in patterns]
        recovered = self.together([partial(self.distill, name, path, teacher) for name, path in zip(names, cut)])
        return dict(zip(names, self.together([partial(self.sample, f"{n}+kd", p) for n, p in zip(names, recovered)])))

    def cut(self, kept: list[int], teacher: Path) -> Path:
        out = self.path("models", f"{pattern_name(kept)}.pt")
        self.script(f"cut-{pattern_name(kept)}", ["prune_by_index.py", "--ckpt", str(teacher), "--kept-indices",
                                                  *map(str, kept), "--save-model", str(out)], distributed=False,
                    output=out)
        return out

    def prepare_data(self) -> tuple[Path, Path, Path]:
        from tinyfusion.evaluation import classifier_accuracy, save_feature_extractor, train_classifier

        b = self.budget
        folder = Path(self.data_path) if self.data_path else self.path("data", "digits")
        if not self.data_path and not folder.is_dir():
            write_digits(folder)
        features = self.path("data", "features")
        self.script("extract_features", ["extract_features.py", "--data-path", str(folder), "--features-path",
                                         str(features), "--vae", "none", "--no-flip", "--image-size",
                                         str(self.image_size), "--num-workers", "0"], distributed=True,
                    output=features / "index.json")
        real_a, real_b, images, labels = real_halves(folder, self.image_size, self.path("data"), self.seed)
        self._bar.update(1)
        classifier = self.path("classifier.pt")
        if not classifier.is_file():
            start = time.time()
            order = np.random.default_rng(self.seed).permutation(len(images))
            cut = int(0.8 * len(images))
            model = train_classifier(images[order[:cut]], labels[order[:cut]], epochs=b.classifier_epochs,
                                     seed=self.seed)
            accuracy = classifier_accuracy(model, images[order[cut:]], labels[order[cut:]])
            save_feature_extractor(classifier, model, name="digits-classifier" if not self.data_path
                                   else "image-classifier", extra={"held_out_accuracy": accuracy})
            self.times["classifier"] = time.time() - start
            atomic_write_json(self.times_file, self.times)
        self._bar.update(1)
        return real_a, real_b, classifier

    def _train_args(self, prefix: str, steps: int, lr: float, schedule: str = "cosine",
                    weights_ema: bool = True, seed: int | None = None, log_every: int | None = None,
                    data: Path | None = None) -> list[str]:
        """The flags of a training script's run; `weights_ema` sets the budget's EMA decay (learned pruning
        keeps the toolkit's gate EMA, whose window follows the run length); `seed` replaces the run's; a
        log line every tenth of the run unless `log_every` says otherwise; `data` replaces the real images'
        features."""
        b = self.budget
        return ["--data-path", str(data or self.path("data", "features")), "--results-dir", str(self.path("runs")),
                "--prefix", prefix, "--max-steps", str(steps), "--global-batch-size", str(b.batch_size),
                "--lr", str(lr), "--lr-schedule", schedule, *(["--ema-decay", str(b.ema_decay)] if weights_ema else []),
                "--log-every", str(log_every or max(steps // 10, 1)),
                "--ckpt-every", str(max(steps // 2, 1)), "--num-workers", "0",
                "--global-seed", str(self.seed if seed is None else seed),
                "--precision", self.precision]

    def train_teacher(self) -> Path:
        b = self.budget
        teacher = self.path("models", "teacher.pt")
        self.script("teacher", ["train.py", "--model", self.teacher_model, *self._train_args(
            "teacher", b.teacher_steps, b.teacher_lr), "--warmup-steps", str(min(100, b.teacher_steps // 10)),
                                "--save-model", str(teacher)], distributed=True, output=teacher)
        return teacher

    def prune(self, method: str, teacher: Path, seed: int | None = None) -> Path:
        """The pruned model of `method` (half depth; half width for the width methods); a learned method with
        another `seed` (decision only) is written beside the row's as METHOD-seedS."""
        b = self.budget
        name = method if seed in (None, self.seed) else f"{method}-seed{seed}"
        out = self.path("models", f"{name}.pt")
        if method.startswith(("learned", "ablation")):
            wide = method == "learned-4-8"
            groups = f"{self.depth // 8}x4:8" if wide else f"{self.depth // 2}x1:2"
            flags = [*ABLATIONS.get(method, (None, LEARNED_FLAGS))[1],
                     *(["--stop-at-confidence", str(STOP_CONFIDENCE)] if wide else [])]
            # The wide group checks its confidence as often as the 1:2 runs log (every tenth of their steps).
            args = self._train_args(f"prune-{name}", b.wide_prune_steps if wide else b.prune_steps, 1e-4, "constant",
                                    weights_ema=False, seed=seed,
                                    log_every=max(b.prune_steps // 10, 1) if wide else None)
            self.script(f"prune-{name}", ["prune_by_learning.py", "--load-weight", str(teacher), "--groups", groups,
                                          *args, *flags, "--save-model", str(out)], distributed=True, output=out)
            shutil.copy(self.path("runs", f"prune-{name}", "decisions.png"), self.path(f"decisions-{name}.png"))
        elif method in WIDTH_METHODS:
            self.script(f"prune-{method}", ["prune_by_score.py", "--ckpt", str(teacher), "--width-ratio",
                                            str(WIDTH_RATIO), "--width-criterion", "taylor", "--taylor-threshold",
                                            str(b.taylor_threshold), "--data-path",
                                            str(self.path("data", "features")), "--batch-size", str(b.batch_size),
                                            "--global-seed", str(self.seed), "--save-model", str(out)],
                        distributed=True, output=out)
        elif method == "oracle":
            self.script("prune-oracle", ["prune_by_index.py", "--ckpt", str(teacher), "--preset", "oracle",
                                         "--save-model", str(out)], distributed=False, output=out)
        else:
            extra = [] if method == "random" else ["--data-path", str(self.path("data", "features")),
                                                   "--num-batches", "4", "--batch-size", str(b.batch_size)]
            self.script(f"prune-{method}", ["prune_by_score.py", "--ckpt", str(teacher), "--criterion", method,
                                            "--target-depth", *self.half_depth(), "--global-seed", str(self.seed),
                                            *extra,
                                            "--save-model", str(out)], distributed=True, output=out)
        return out

    def distill(self, method: str, student: Path, teacher: Path) -> Path:
        b = self.budget
        out = self.path("models", f"{method}+kd.pt")
        self.script(f"kd-{method}", ["train_masked_kd.py", "--load-weight", str(student), "--load-teacher",
                                     str(teacher), *self._train_args(f"kd-{method}", b.recover_steps, b.recover_lr),
                                     "--save-model", str(out)], distributed=True, output=out)
        return out

    def finetune(self, method: str, student: Path) -> Path:
        b = self.budget
        out = self.path("models", f"{method}+ft.pt")
        self.script(f"ft-{method}", ["train.py", "--load-weight", str(student),
                                     *self._train_args(f"ft-{method}", b.recover_steps, b.recover_lr),
                                     "--save-model", str(out)], distributed=True, output=out)
        return out

    def ceiling(self, teacher: Path) -> Path:
        """The control: the unpruned teacher given the same extra training as each pruned model."""
        b = self.budget
        out = self.path("models", "teacher+train.pt")
        self.script("ceiling", ["train.py", "--load-weight", str(teacher),
                                *self._train_args("ceiling", b.recover_steps, b.recover_lr), "--save-model", str(out)],
                    distributed=True, output=out)
        return out

    def self_generated(self, teacher: Path) -> Path:
        """CLEAR's data: the teacher's own samples kept as a feature set (sample_ddp.py --save-latents)."""
        b = self.budget
        folder, npz = self.path("data", "self-generated"), self.path("data", "self-generated.npz")
        self.script("self-generated", [*self._sampling_args(teacher, b.clear_samples, self.seed + CLEAR_SEED_OFFSET,
                                                            npz), "--save-latents", str(folder)], distributed=True,
                    output=npz)
        return folder

    def distill_local(self, teacher: Path, data: Path, attention: dict, trained: bool = True) -> Path:
        """The teacher with `attention` (local), its attention layers distilled by CLEAR on `data`; not `trained`:
        the conversion alone (one step at learning rate 0 keeps every weight)."""
        b = self.budget
        name = clear_name(attention)
        step, out = (f"clear-{name}", self.path("models", f"{name}+clear.pt")) if trained else \
            (f"convert-{name}", self.path("models", f"{name}.pt"))
        budget = (b.recover_steps, b.recover_lr) if trained else (1, 0.0)
        self.script(step, ["train_masked_kd.py", "--load-weight", str(teacher), "--load-teacher", str(teacher),
                           "--attention", "local", "--attention-radius", f"{attention['radius']:g}",
                           "--attention-pool", str(attention["pool"]),
                           *self._train_args(step, *budget, schedule="cosine" if trained else "constant", data=data),
                           "--save-model", str(out)], distributed=True, output=out)
        return out

    def _sampling_args(self, ckpt: Path, count: int, seed: int, npz: Path) -> list[str]:
        """sample_ddp.py as every sample set of the run is drawn: the family's sampler and steps, the budget's
        guidance."""
        b = self.budget
        return ["sample_ddp.py", "--ckpt", str(ckpt), "--vae", "none", "--num-fid-samples", str(count),
                "--per-proc-batch-size", "128", *FAMILIES[self.family]["sampler"], "--num-sampling-steps",
                str(FAMILIES[self.family].get("sampling_steps", b.sampling_steps)), "--cfg-scale", str(b.cfg_scale),
                "--global-seed", str(seed), "--sample-dir", str(self.path("samples", "parts")), "--npz", str(npz),
                "--precision", self.precision]

    def sample(self, name: str, ckpt: Path, seed: int | None = None) -> Path:
        npz = self.path("samples", f"{name}.npz")
        self.script(f"sample-{name}", self._sampling_args(ckpt, self.budget.num_samples,
                                                          self.seed if seed is None else seed, npz),
                    distributed=True, output=npz)
        _grid(npz, self.path("grids", f"{name}.png"))
        return npz

    def score(self, real_a: Path, real_b: Path, samples: dict[str, Path], classifier: Path) -> dict[str, dict]:
        out = self.path("fid.json")
        self.script("evaluate", ["evaluator.py", str(real_a), str(real_b), *map(str, samples.values()),
                                 "--feature-extractor", str(classifier), "--fid-method", "eigvals", "--out", str(out),
                                 "--device", self.device], distributed=False)
        results = json.loads(out.read_text())["results"]
        return dict(zip(["real (other half)", *samples], results))

    def measure_latency(self, models: dict[str, Path], names: list[str]) -> dict[str, dict]:
        """Forward latency of each distinct architecture among the models `names` (models that differ only in
        which blocks they kept cost the same; local attention is an architecture of its own), timed once by
        benchmarks/forward.py."""
        from tinyfusion.checkpoint import read_checkpoint

        by_architecture: dict[str, list[str]] = {}
        for name in names:
            record = read_checkpoint(models[name])
            key = json.dumps([record["arch"], record["config"]], sort_keys=True)
            by_architecture.setdefault(key, []).append(name)
        representatives = [names[0] for names in by_architecture.values()]
        out = self.path("latency.json")
        self.script("latency", ["-m", "benchmarks.forward", "--models", *(str(models[n]) for n in representatives),
                                "--batch-sizes", "256", "--device", self.device, "--repeats", "10",
                                *(["--precisions", self.precision, "--paths", "held"]
                                  if self.precision != "fp32" else []),
                                # the report reads the latencies only: a small GEMM for the peak keeps the step short
                                "--peak-size", "512", "--out", str(out)],
                    distributed=False)
        rows = json.loads(out.read_text())["forward"]
        return {name: row for names, row in zip(by_architecture.values(), rows) for name in names}

    # ----------------------------------------------------------------- the report

    def report(self, models: dict[str, Path], fid: dict[str, dict], latency: dict[str, dict],
               pruned: dict[str, Path], decisions: dict[str, list[tuple[int, Path]]]) -> dict:
        from tinyfusion.checkpoint import load_model, read_checkpoint
        from tinyfusion.training import parameter_count

        def fid_of(name: str) -> float:
            return fid[name]["metrics"]["fid"]

        # --exhaustive: the FID after recovery of every 1:2 pattern, and where a pick ranks among them.
        patterns = {tuple(kept): fid_of(pattern_name(kept)) for kept in one_of_each_pair(self.depth)
                    if pattern_name(kept) in fid} if self.exhaustive else {}

        def rank(kept: list[int] | None, fid_after: float | None) -> str | None:
            if not patterns or kept is None:
                return None
            score = patterns.get(tuple(kept), fid_after)
            if score is None:
                return None
            return f"{1 + sum(other < score for other in patterns.values())} of {len(patterns)}"

        teacher_latency = latency["teacher"]["latency_ms"] / latency["teacher"]["batch"]
        rows = [{"model": "real digits (other half)" if not self.data_path else "real images (other half)",
                 "method": "floor", "fid_after": fid_of("real (other half)")}]

        def row(name: str, method: str, base: str, after: str | None, times: list[str]) -> dict:
            loaded = load_model(models[after or base])
            lat = latency[base]["latency_ms"] / latency[base]["batch"]
            return {"model": name, "method": method, "depth": total_depth(loaded.model),
                    "params_m": parameter_count(loaded.model) / 1e6,
                    "latency_ms": lat, "speedup": teacher_latency / lat,
                    "fid_before": fid_of(base) if after else None, "fid_after": fid_of(after or base),
                    "kept": (loaded.lineage or {}).get("kept_indices"),
                    "rank": rank((loaded.lineage or {}).get("kept_indices"), fid_of(after or base))
                    if after and base in METHODS else None,
                    "seconds": sum(self.times.get(t, 0.0) for t in times)}

        rows.append(row("teacher", f"{self.teacher_model} from scratch, {self.budget.teacher_steps} steps", "teacher",
                        None, ["teacher"]))
        rows.append(row("teacher + recovery budget", "ceiling: the teacher trained as long as each recovery",
                        "teacher", "teacher+train", ["ceiling"]))
        for m in self.methods:
            rows.append(row(f"{m} + masked KD", METHOD_LABELS[m], m, f"{m}+kd", [f"prune-{m}", f"kd-{m}"]))
        rows.append(row("learned-1-2 + fine-tuning", METHOD_LABELS["learned-1-2"] + ", plain fine-tuning",
                        "learned-1-2", "learned-1-2+ft", ["prune-learned-1-2", "ft-learned-1-2"]))
        clear = None
        if self.clear:
            name, grid = clear_name(self.attention), "x".join(map(str, self.grid))
            rows.append({**row(f"CLEAR {describe_attention(self.attention)}",
                               f"CLEAR: the teacher's attention made local on its {grid} token grid, the attention "
                               f"layers distilled on {self.budget.clear_samples} of its own samples (FID before: "
                               "converted, not distilled)", name, f"{name}+clear", ["self-generated", f"clear-{name}"]),
                         "attention": self.attention})
            clear = {"grid": list(self.grid), "attention": self.attention, "samples": self.budget.clear_samples,
                     "data": str(self.path("data", "self-generated")), "model": str(models[f"{name}+clear"]),
                     "untrained": str(models[name])}
        ablation = []
        for name, (label, _) in ABLATIONS.items():
            if name not in pruned:
                continue
            decision = read_checkpoint(pruned[name])["extra"]["decision"]
            ablation.append({"name": name, "setting": label, "kept": decision["kept_indices"],
                             "raw_kept": decision.get("raw_kept_indices"), "ema_decay": decision.get("ema_decay"),
                             "fid_after": patterns.get(tuple(decision["kept_indices"])),
                             "rank": rank(decision["kept_indices"], None)})
        seeds = {}
        for name, runs in decisions.items():
            made = []
            for seed, path in runs:
                d = read_checkpoint(path)["extra"]["decision"]
                made.append({"seed": seed, "kept": d["kept_indices"], "raw_kept": d.get("raw_kept_indices"),
                             "confidence_min": min(d["confidence"]), "steps_run": d.get("steps_run", d["steps"]),
                             "steps": d["steps"], "rank": rank(d["kept_indices"], None)})
            label = METHOD_LABELS.get(name) or ABLATIONS[name][0]
            seeds[name] = {"setting": label, "decisions": made,
                           "agree": all(m["kept"] == made[0]["kept"] for m in made)}
        teacher_fids = [fid_of("teacher"), *(fid_of(n) for n in fid if n.startswith("teacher-seed"))]
        feature_space = next(iter(fid.values()))["feature_space"]
        ordered = sorted(patterns.items(), key=lambda item: item[1])
        result = {"rows": rows, "ablation": ablation, "seeds": seeds, "fast": self.budget == FAST, "clear": clear,
                  "teacher_fid_over_seeds": teacher_fids,
                  "patterns": [{"kept": list(k), "fid_after": v} for k, v in ordered],
                  "best_pattern": {"kept": list(ordered[0][0]), "fid_after": ordered[0][1]} if ordered else None,
                  "feature_space": feature_space, "budget": dataclasses.asdict(self.budget),
                  "nproc": self.nproc, "jobs": self.jobs, "launch": self.launch, "device": self.device,
                  "precision": self.precision,
                  "step_seconds": self.times,
                  "wall_seconds": time.time() - self.started}
        atomic_write_json(self.path("results.json"), result)
        atomic_write(self.path("results.md"), lambda f: f.write(format_report(result).encode()))
        return result


def format_report(result: dict) -> str:
    """The results table in markdown."""
    space = result["feature_space"]
    lines = []
    if result.get("fast"):
        lines += ["**Smoke run (--fast): tiny budgets that only check that every stage runs. Its numbers and its "
                  "sample grids (mostly noise) say nothing about the methods; run without --fast for those.**", ""]
    ranked = bool(result.get("patterns"))
    lines += [f"FID in the feature space of {space} (not Inception); latency per image on CPU at batch 256.", "",
              f"| model | method | depth | params | latency/img | speedup | FID before recovery ({space}) | "
              f"FID after recovery ({space}) | kept blocks |" + (" rank among the 1:2 patterns |" if ranked else "")
              + " wall time |",
              "|---|---|---|---|---|---|---|---|---|" + ("---|" if ranked else "") + "---|"]

    def fmt(value, pattern):
        return pattern.format(value) if value is not None else ""

    for r in result["rows"]:
        lines.append(" | ".join([
            f"| {r['model']}", r["method"], fmt(r.get("depth"), "{}"), fmt(r.get("params_m"), "{:.2f}M"),
            fmt(r.get("latency_ms"), "{:.3f} ms"), fmt(r.get("speedup"), "{:.2f}x"), fmt(r.get("fid_before"), "{:.2f}"),
            fmt(r.get("fid_after"), "{:.2f}"), fmt(r.get("kept"), "{}"),
            *([fmt(r.get("rank"), "{}")] if ranked else []), fmt(r.get("seconds"), "{:.0f} s")]) + " |")
    lines += ["", "TinyFusion's decision under each setting (1:2 groups; the EMA decision is the one saved, the raw "
                  "gates' is what they read at the end):", "",
              "| setting | gate EMA decay | kept (EMA) | kept (raw gates) |"
              + (" FID after recovery | rank among the 1:2 patterns |" if ranked else ""),
              "|---|---|---|---|" + ("---|---|" if ranked else "")]
    for a in result.get("ablation", []):
        lines.append(f"| {a['setting']} | {fmt(a.get('ema_decay'), '{:.4g}')} | {a['kept']} | {a.get('raw_kept')} |"
                     + (f" {fmt(a.get('fid_after'), '{:.2f}')} | {fmt(a.get('rank'), '{}')} |" if ranked else ""))
    seeds = result.get("seeds", {})
    if seeds:
        count = max(len(entry["decisions"]) for entry in seeds.values())
        lines += ["", f"Every learned decision made with {count} seeds (the rows above use the first; the others "
                      "decide only):", "",
                  "| setting | seed | kept (EMA) | kept (raw gates) | lowest EMA confidence | steps run |"
                  + (" rank among the 1:2 patterns |" if ranked else ""),
                  "|---|---|---|---|---|---|" + ("---|" if ranked else "")]
        for entry in seeds.values():
            for d in entry["decisions"]:
                steps = f"{d['steps_run']}" + (f" of {d['steps']}" if d["steps_run"] != d["steps"] else "")
                lines.append(f"| {entry['setting']} | {d['seed']} | {d['kept']} | {d['raw_kept']} | "
                             f"{d['confidence_min']:.3f} | {steps} |" + (f" {fmt(d.get('rank'), '{}')} |" if ranked
                                                                         else ""))
    fids = result.get("teacher_fid_over_seeds") or []
    if len(fids) > 1:
        lines += ["", f"The teacher's FID over {len(fids)} sampling seeds: " + ", ".join(f"{v:.2f}" for v in fids)
                  + f" (spread {max(fids) - min(fids):.2f}): differences smaller than that are sampling noise."]
    if ranked:
        best = result["best_pattern"]
        lines += ["", f"--exhaustive: every 1:2 pattern recovered with the same budget; the best is {best['kept']} "
                      f"(FID {best['fid_after']:.2f}). All, best first: "
                  + ", ".join(f"{p['kept']} {p['fid_after']:.2f}" for p in result["patterns"])]
    lines += ["", "Wall time of each step (seconds): " + ", ".join(f"{k} {v:.0f}"
                                                                 for k, v in result["step_seconds"].items()),
              f"This run: {result['wall_seconds']:.0f} s wall-clock on {result.get('device', 'cpu')} "
              f"({result.get('precision', 'fp32')}), {result['nproc']} process(es) per script, "
              f"{result['jobs']} script(s) at a time (steps already done in the folder were reused)."]
    return "\n".join(lines) + "\n"


def _grid(npz: Path, png: Path, per_class: int = 8, max_classes: int = 10, min_side: int = 64) -> None:
    """A grid of a sample set, one row per class (the first `per_class` samples of each), small images
    enlarged (nearest neighbour) so that a 8x8 digit is visible."""
    with np.load(npz) as data:
        images, labels = data["arr_0"], data["arr_1"]
    rows = [np.flatnonzero(labels == c)[:per_class] for c in np.unique(labels)[:max_classes]]
    picked = np.concatenate([images[r] for r in rows if len(r) == per_class])
    save_grid(picked, png, nrow=per_class, min_side=min_side, pad_value=0.5)


def default_out(family: str, fast: bool, device: str = "cpu") -> str:
    """results/quickstart, with -sit / -mar for the other families, -fast for --fast and -cuda for --device cuda: a
    fast run never lands in (and is never refused by) the folder of a full one, nor a GPU run in a CPU run's."""
    return ("results/quickstart" + ("" if family == "dit" else f"-{family}") + ("-fast" if fast else "")
            + ("" if device == "cpu" else f"-{device}"))


def run_quickstart(args: argparse.Namespace) -> dict:
    """quickstart.py."""
    budget = FAST if args.fast else DEFAULT
    # With --fast, launching torchrun would cost more than the tiny budgets themselves.
    nproc = args.nproc if args.nproc is not None else (1 if args.fast else 2)
    if nproc < 1:
        raise UserError(f"--nproc must be at least 1, got {nproc}")
    out = args.out or default_out(args.family, args.fast, args.device)
    quickstart = Quickstart(Path(out), budget, nproc, args.data_path, args.image_size, args.seed, args.family,
                            exhaustive=args.exhaustive, clear=args.clear, device=args.device, launch=args.launch)
    start = time.time()
    try:
        result = quickstart.run()
    except StepFailed as e:
        print(f"\n{e}", file=sys.stderr)
        raise SystemExit(1) from None
    finally:
        quickstart.close()
    print("\n" + format_report(result))
    print(f"quickstart finished in {time.time() - start:.0f} s; results in {out}/results.md, grids in "
          f"{out}/grids, decision plots in {out}/decisions-*.png")
    return result
