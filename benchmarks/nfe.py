r"""FID against the number of function evaluations, for every sampler of a model's process, on a teacher and
its students, with images per second of the sampling loop: where a pruned, narrowed or local student sampled with
few evaluations stands against the teacher sampled as its paper does.

Usage (from the repository root):
    python quickstart.py --clear && python -m benchmarks.nfe --quickstart results/quickstart --out results/nfe-dit
    python quickstart.py --family sit && python -m benchmarks.nfe --quickstart results/quickstart-sit \
        --out results/nfe-sit
    python -m benchmarks.nfe --models DiT-XL-2-256x256.pt tinydit-d14.pt --vae ema --ref VIRTUAL_imagenet256.npz \
        --num-samples 10000 --cfg-scale 1.5 --device cuda --out results/nfe-xl

The first model is the teacher, the rest its students (with --quickstart: the folder's teacher and every
recovered model in it, or the --students named; its reference half, digits classifier, guidance and sample
count). Each model is sampled by every setting of its process's `evaluation_sweep` at about each of
--evaluations network evaluations per image (Gaussian: ddpm, ddim and diffusers' dpm++, dpm++-sde, unipc,
euler-a, ddim-hf, one evaluation per step; transport: the ODE with Euler and Heun, the SDE with Euler-Maruyama
and Heun, and dopri5 at three tolerances; MAR: its masked iterations, one backbone pass each). A guided evaluation
(conditional and null rows in one call) counts once; the NFE column is counted while sampling. Image i has the same
seed and label under every setting and model, as sample_ddp.py draws FID sets, so the teacher's row of the
quickstart's own sampler reproduces the quickstart's FID.

images/s is the sampling loop of sample.py and sample_ddp.py (model, guidance, sampler, decoder, uint8), timed
over the FID set, without process start-up and file writes. The headline compares the teacher sampled by its
process's default (DiT: 250 DDPM steps; SiT: dopri5; MAR: one iteration per token) with the fastest student
whose FID at --target-evaluations is within --fid-tolerance of it; the two (and the teacher's own best setting at
the target) are timed again side by side, in turns, on one batch, for a fair ratio. Prints the tables and writes
OUT.json, OUT.md and OUT.png (FID against NFE per model; FID against images/s of every setting).
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from benchmarks.harness import _sync, device_name, format_table, time_interleaved
from models import total_depth, unwrap
from processes import NoiseProcess, SweepPoint, create_process
from tinyfusion.args import Parser, positive_int
from tinyfusion.checkpoint import LoadedModel
from tinyfusion.cli import run_script
from tinyfusion.errors import UserError
from tinyfusion.evaluation import evaluate, load_extractor
from tinyfusion.fileio import atomic_write, atomic_write_json
from tinyfusion.paths import check_outputs
from tinyfusion.precision import PRECISIONS
from tinyfusion.sampling import SamplingSpec, image_labels, image_seeds, load_for_sampling, sample_images, to_uint8
from tinyfusion.training import parameter_count
from tinyfusion.vae import LatentCodec

# The quickstart's recovered models: every file of its models/ folder with one of these endings is a student.
QUICKSTART_STUDENT_SUFFIXES = ("+kd.pt", "+ft.pt", "+clear.pt")
ROW_COLUMNS = [("model", "{}"), ("sampler", "{}"), ("steps", "{}"), ("nfe", "{:.1f}"), ("fid", "{:.2f}"),
               ("images_per_s", "{:.1f}")]


def parse_args(argv=None):
    parser = Parser(__doc__)
    parser.add_argument("--quickstart", default=None,
                        help="a quickstart.py output folder: its teacher and students, reference half, classifier, "
                             "guidance and sample count")
    parser.add_argument("--students", nargs="+", default=None,
                        help="with --quickstart: the students by name (e.g. learned-1-2+kd diff-pruning+kd); default "
                             "every recovered model of the folder")
    parser.add_argument("--models", nargs="+", default=None,
                        help="checkpoints, the teacher first (NAME=PATH names a row; default the file's stem)")
    parser.add_argument("--ref", default=None, help="reference images or statistics (.npz or folder)")
    parser.add_argument("--feature-extractor", default=None, help="feature-extractor file; default Inception")
    parser.add_argument("--vae", default="auto", help="the codec (default: the one each checkpoint records)")
    parser.add_argument("--num-samples", type=positive_int, default=None,
                        help="images per setting (default: the quickstart's count, else 10000)")
    parser.add_argument("--cfg-scale", type=float, default=None,
                        help="guidance (default: the quickstart's, else 1.5, DiT's FID setting)")
    parser.add_argument("--evaluations", type=positive_int, nargs="+", default=[10, 25, 50, 100, 250],
                        help="network evaluations per image to sweep")
    parser.add_argument("--samplers", nargs="+", default=None,
                        help="only these settings of the sweep (by name: ddpm, dpm++, ode-heun, sde-euler, ...; "
                             "dopri5 by ode-dopri5); the teacher's default setting always runs")
    parser.add_argument("--student-samplers", nargs="+", default=None,
                        help="the students' settings (default: --samplers); a sweep costs the teacher's evaluations "
                             "for every setting, so a run may give the students the few-step ones only")
    parser.add_argument("--student-evaluations", type=positive_int, nargs="+", default=None,
                        help="the students' evaluation counts (default: --evaluations)")
    parser.add_argument("--target-evaluations", type=positive_int, default=25,
                        help="the students' budget in the headline")
    parser.add_argument("--fid-tolerance", type=float, default=0.10,
                        help="a student's FID may exceed the teacher's default-sampler FID by this fraction")
    parser.add_argument("--batch-size", type=positive_int, default=128)
    parser.add_argument("--precision", choices=PRECISIONS, default="fp32")
    parser.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    parser.add_argument("--seed", type=int, default=0, help="the FID sets' seed (sample_ddp.py --global-seed)")
    parser.add_argument("--repeats", type=positive_int, default=3, help="turns of the side-by-side timing")
    parser.add_argument("--threads", type=positive_int, default=None, help="CPU threads (default: torch's)")
    parser.add_argument("--out", default=None, help="write OUT.json, OUT.md and OUT.png")
    return parser.parse_args(argv)


@dataclass
class Subject:
    """A model of the comparison, loaded for sampling."""

    name: str
    path: str
    loaded: LoadedModel
    codec: LatentCodec
    process: NoiseProcess

    @property
    def model(self):
        return self.loaded.model

    def spec(self, point: SweepPoint, cfg_scale: float, precision: str) -> SamplingSpec:
        return SamplingSpec.for_process(self.process, sampler=point.sampler, num_steps=point.num_steps,
                                        options=point.options, data_shape=unwrap(self.model).data_shape,
                                        cfg_scale=cfg_scale, precision=precision)


@dataclass(frozen=True)
class Plan:
    """What the command line resolves to: the models (teacher first) and how they are scored."""

    models: list[tuple[str, str]]
    ref: str
    feature_extractor: str | None
    vae: str
    num_samples: int
    cfg_scale: float


def resolve_plan(args) -> Plan:
    """The models and scoring settings of --quickstart or of --models/--ref, checked."""
    if (args.quickstart is None) == (args.models is None):
        raise UserError("give either --quickstart FOLDER (a quickstart.py output) or --models TEACHER STUDENT ... "
                        "with --ref")
    if args.quickstart is None:
        if args.students is not None:
            raise UserError("--students picks students of a --quickstart folder; with --models list the files")
        if args.ref is None:
            raise UserError("--models needs --ref, the reference images or statistics FID is computed against")
        models = []
        for spec in args.models:
            name, _, path = spec.rpartition("=") if "=" in spec else (Path(spec).stem, "", spec)
            models.append((name, path))
        return Plan(models, args.ref, args.feature_extractor, args.vae, args.num_samples or 10000,
                    1.5 if args.cfg_scale is None else args.cfg_scale)
    folder = Path(args.quickstart)
    record, teacher = folder / "quickstart.json", folder / "models" / "teacher.pt"
    if not record.is_file() or not teacher.is_file():
        raise UserError(f"--quickstart {folder}: no quickstart run there (quickstart.json and models/teacher.pt); "
                         "run quickstart.py first, or pass its --out folder")
    budget = json.loads(record.read_text())["budget"]
    found = {p.name[:-3]: p for p in sorted((folder / "models").iterdir())
             if p.name.endswith(QUICKSTART_STUDENT_SUFFIXES)}
    names = args.students if args.students is not None else list(found)
    missing = [n for n in names if n not in found]
    if missing:
        raise UserError(f"--students {' '.join(missing)}: not in {folder / 'models'} (it holds "
                         f"{', '.join(found) or 'no recovered model yet'})")
    if not names:
        raise UserError(f"--quickstart {folder}: no recovered model yet; let quickstart.py finish its recovery stage")
    if args.ref is not None or args.feature_extractor is not None:
        raise UserError("--quickstart scores against its own reference half and classifier; drop --ref and "
                        "--feature-extractor")
    return Plan([("teacher", str(teacher)), *((n, str(found[n])) for n in names)],
                str(folder / "data" / "real_a.npz"), str(folder / "classifier.pt"), "none",
                args.num_samples or budget["num_samples"],
                budget["cfg_scale"] if args.cfg_scale is None else args.cfg_scale)


def setting_key(spec: SamplingSpec) -> str:
    """What makes two settings draw the same images (the same sampler, steps and options)."""
    return json.dumps([spec.sampler, spec.num_steps, spec.options], sort_keys=True)


class Sweep:
    """Samples and scores every setting; rows are dicts (see ROW_COLUMNS)."""

    def __init__(self, plan: Plan, extractor, device: torch.device, batch_size: int, seed: int, precision: str):
        self.plan, self.extractor, self.device = plan, extractor, device
        self.batch_size, self.seed, self.precision = batch_size, seed, precision

    def labels_and_seeds(self, subject: Subject, count: int) -> tuple[torch.Tensor, list[int]]:
        indices = range(count)
        labels = image_labels(self.seed, indices, unwrap(subject.model).num_classes)
        return torch.tensor(labels, device=self.device), image_seeds(self.seed, indices)

    def draw(self, subject: Subject, spec: SamplingSpec, count: int) -> tuple[np.ndarray, float]:
        """`count` images (uint8) of the FID set under `spec`, and the mean evaluations per image."""
        labels, seeds = self.labels_and_seeds(subject, count)
        images, nfe = [], []
        for begin in range(0, count, self.batch_size):
            part = slice(begin, begin + self.batch_size)
            images.append(to_uint8(sample_images(subject.model, subject.process, subject.codec, labels[part],
                                                 seeds[part], spec)))
            nfe.append(subject.process.last_nfe.float())
        return np.concatenate(images), float(torch.cat(nfe).mean())

    def score(self, subject: Subject, point: SweepPoint, spec: SamplingSpec, role: str) -> dict:
        _sync(self.device)
        start = time.perf_counter()
        images, nfe = self.draw(subject, spec, self.plan.num_samples)
        _sync(self.device)
        seconds = time.perf_counter() - start
        fid = evaluate(self.plan.ref, images, self.extractor, progress=False, fid_method="eigvals")["metrics"]["fid"]
        return {"model": subject.name, "role": role, "sampler": point.name, "run_sampler": spec.sampler,
                "steps": spec.num_steps, "options": spec.options, "planned_nfe": point.evaluations, "nfe": nfe,
                "fid": fid, "seconds": seconds, "images_per_s": self.plan.num_samples / seconds}


def teacher_default(subject: Subject) -> SweepPoint:
    """The teacher's process's default sampling (DiT: 250 DDPM steps), as a sweep point."""
    spec = SamplingSpec.for_process(subject.process, sampler=None, num_steps=None,
                                    data_shape=unwrap(subject.model).data_shape)
    return SweepPoint(f"{spec.sampler_name()} (default)", spec.sampler, spec.num_steps, spec.options, None)


def sweep_points(subject: Subject, evaluations: list[int], samplers: list[str] | None) -> list[SweepPoint]:
    points = subject.process.evaluation_sweep(evaluations, unwrap(subject.model).data_shape)
    if samplers is None:
        return points
    known = sorted({p.name.split(" ")[0] for p in points})
    unknown = [s for s in samplers if s not in known]
    if unknown:
        raise UserError(f"--samplers {' '.join(unknown)}: not a setting of the {subject.process.name} process's "
                         f"sweep ({subject.name}); choose from {', '.join(known)}")
    return [p for p in points if p.name.split(" ")[0] in samplers]


def asked_count(point: SweepPoint, counts: list[int]) -> int | None:
    """The asked evaluation count a fixed-grid point was swept for (the nearest: Heun's grids give odd counts, 24 for
    about 25), or None for an adaptive setting and the teacher's default."""
    if point.evaluations is None:
        return None
    return min(counts, key=lambda n: (abs(n - point.evaluations), n))


def headline(rows: list[dict], baseline: dict, target: int, tolerance: float) -> dict:
    """The fastest student swept for `target` evaluations (row "asked") whose FID is within `tolerance` of the
    teacher's default row (else the student with the lowest FID there), and the teacher's own best setting there."""
    at_target = [r for r in rows if r["asked"] == target]
    students = [r for r in at_target if r["role"] == "student"]
    within = [r for r in students if r["fid"] <= (1 + tolerance) * baseline["fid"]]
    best = max(within, key=lambda r: r["images_per_s"]) if within else \
        min(students, key=lambda r: r["fid"], default=None)
    teacher = min((r for r in at_target if r["role"] == "teacher"), key=lambda r: r["fid"], default=None)
    return {"baseline": baseline, "student": best, "teacher_at_target": teacher, "fid_within": bool(within),
            "fid_limit": (1 + tolerance) * baseline["fid"]}


def side_by_side(sweep: Sweep, subjects: dict[str, Subject], rows: list[dict], cfg_scale: float, precision: str,
                 repeats: int) -> list[dict]:
    """images/s of the given rows' settings timed again in turns, on one batch each (`time_interleaved`)."""
    calls = []
    for row in rows:
        subject = subjects[row["model"]]
        spec = SamplingSpec(sampler=row["run_sampler"], num_steps=row["steps"], options=row["options"],
                            cfg_scale=cfg_scale, precision=precision)
        labels, seeds = sweep.labels_and_seeds(subject, sweep.batch_size)
        calls.append(lambda s=subject, spec=spec, labels=labels, seeds=seeds: to_uint8(
            sample_images(s.model, s.process, s.codec, labels, seeds, spec)))
    timed = time_interleaved(calls, sweep.device, 1, repeats)
    return [{"model": row["model"], "sampler": row["sampler"], "nfe": row["nfe"], "fid": row["fid"],
             "images_per_s": sweep.batch_size / statistics.median(times)} for row, (times, _) in zip(rows, timed)]


def pivot(rows: list[dict], evaluations: list[int]) -> str:
    """FID (images/s) per model and sampler, a column per swept evaluation count; adaptive settings and the
    teacher's default in their own column, with their measured NFE."""
    lines = ["| model | sampler | " + " | ".join(f"~{n}" for n in evaluations) + " | adaptive / default |",
             "|---|---|" + "---|" * (len(evaluations) + 1)]
    order: list[tuple[str, str]] = []
    for r in rows:
        key = (r["model"], r["sampler"].split(" ")[0])
        if key not in order:
            order.append(key)
    for model, sampler in order:
        mine = [r for r in rows if r["model"] == model and r["sampler"].split(" ")[0] == sampler]
        cells = []
        for n in evaluations:
            hit = [r for r in mine if r["asked"] == n]
            cells.append(", ".join(f"{r['fid']:.2f} ({r['images_per_s']:.0f})" + (
                f" at NFE {r['planned_nfe']}" if r["planned_nfe"] != n else "") for r in hit))
        other = [r for r in mine if r["asked"] is None]
        cells.append(", ".join(f"{r['fid']:.2f} ({r['images_per_s']:.0f}) at NFE {r['nfe']:.0f}" for r in other))
        lines.append(f"| {model} | {sampler} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summary_lines(result: dict) -> list[str]:
    h, timed = result["headline"], result["side_by_side"]
    base = timed[0]
    lines = [f"teacher, {h['baseline']['sampler']}: NFE {h['baseline']['nfe']:.0f}, FID {h['baseline']['fid']:.2f}, "
             f"{base['images_per_s']:.2f} images/s (side by side)"]
    for row in timed[1:]:
        lines.append(f"{row['model']}, {row['sampler']}: NFE {row['nfe']:.0f}, FID {row['fid']:.2f}, "
                     f"{row['images_per_s']:.2f} images/s: {row['images_per_s'] / base['images_per_s']:.1f}x")
    if h["student"] is not None:
        ratio = timed[-1]["images_per_s"] / base["images_per_s"]
        fid_ok = "within" if h["fid_within"] else "NOT within"
        lines.append(f"best student at {result['target_evaluations']} evaluations: {h['student']['model']} "
                     f"({h['student']['sampler']}), {ratio:.1f}x the teacher's throughput, FID "
                     f"{h['student']['fid']:.2f} {fid_ok} {result['fid_tolerance']:.0%} of {h['baseline']['fid']:.2f} "
                     f"(aim: >= 20x within 10%: {'met' if ratio >= 20 and h['fid_within'] else 'missed'})")
    return lines


def main(args) -> dict:
    plan = resolve_plan(args)
    stem = args.out
    check_outputs({f"--out (.{ext})": stem and f"{stem}.{ext}" for ext in ("json", "md", "png")},
                  {"--ref": plan.ref, "--feature-extractor": plan.feature_extractor,
                   **{f"model {name}": path for name, path in plan.models}})
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    subjects: dict[str, Subject] = {}
    for name, path in plan.models:
        if name in subjects:
            raise UserError(f"two models are named {name!r}; name them NAME=PATH")
        loaded, codec = load_for_sampling(path, vae=plan.vae, device=device)
        subjects[name] = Subject(name, path, loaded, codec, create_process(loaded.process))
    teacher = next(iter(subjects.values()))
    points = {name: sweep_points(s, args.evaluations, args.samplers) if s is teacher else
              sweep_points(s, args.student_evaluations or args.evaluations, args.student_samplers or args.samplers)
              for name, s in subjects.items()}
    default_point = teacher_default(teacher)
    extractor = load_extractor(plan.feature_extractor)
    sweep = Sweep(plan, extractor, device, args.batch_size, args.seed, args.precision)
    where = device_name(device)
    print(f"{len(subjects)} models x {sum(map(len, points.values()))} settings, {plan.num_samples} images each, "
          f"cfg {plan.cfg_scale:g}, {args.precision}, on {where} ({torch.get_num_threads()} threads)", flush=True)
    rows = []
    for name, subject in subjects.items():
        role = "teacher" if subject is teacher else "student"
        seen: dict[str, dict] = {}
        todo = points[name] + ([default_point] if role == "teacher" else [])
        for point in todo:
            spec = subject.spec(point, plan.cfg_scale, args.precision)
            key = setting_key(spec)
            if key in seen:  # the default setting is often one of the sweep's: scored once
                row = {**seen[key], "sampler": point.name, "planned_nfe": point.evaluations}
            else:
                row = sweep.score(subject, point, spec, role)
                seen[key] = row
            row["asked"] = asked_count(point, args.evaluations if role == "teacher" else
                                       args.student_evaluations or args.evaluations)
            rows.append(row)
            print(format_table([row], ROW_COLUMNS, header=False), flush=True)
    baseline = next(r for r in rows if r["role"] == "teacher" and "(default)" in r["sampler"])
    head = headline([r for r in rows if "(default)" not in r["sampler"]], baseline, args.target_evaluations,
                    args.fid_tolerance)
    compared = [baseline, *([head["teacher_at_target"]] if head["teacher_at_target"] else []),
                *([head["student"]] if head["student"] else [])]
    timed = side_by_side(sweep, subjects, compared, plan.cfg_scale, args.precision, args.repeats)
    result = {"device": where, "threads": torch.get_num_threads(), "torch": torch.__version__,
              "num_samples": plan.num_samples, "cfg_scale": plan.cfg_scale, "precision": args.precision,
              "batch_size": args.batch_size, "feature_space": extractor.name, "ref": plan.ref,
              "evaluations": args.evaluations, "target_evaluations": args.target_evaluations,
              "fid_tolerance": args.fid_tolerance,
              "models": [{"name": s.name, "path": s.path, "depth": total_depth(s.model),
                          "params_m": parameter_count(s.model) / 1e6} for s in subjects.values()],
              "rows": rows, "headline": head, "side_by_side": timed}
    counts = sorted({*args.evaluations, *(args.student_evaluations or [])})
    report = "\n\n".join([format_table(rows, ROW_COLUMNS), pivot(rows, counts),
                          "\n".join(summary_lines(result))])
    print("\n" + report)
    if stem:
        atomic_write_json(f"{stem}.json", result)
        atomic_write(f"{stem}.md", lambda f: f.write((f"{where}, {args.precision}, {plan.num_samples} images per "
                                                      f"setting, FID in {extractor.name}\n\n{report}\n").encode()))
        plot(result, f"{stem}.png")
    return result


def plot(result: dict, path: str) -> None:
    """FID against NFE, a panel per model (a line per sampler, the teacher's default FID dashed), and FID against
    images/s of every setting of every model."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, baseline = result["rows"], result["headline"]["baseline"]
    models = [m["name"] for m in result["models"]]
    fig, axes = plt.subplots(1, len(models) + 1, figsize=(3.2 * (len(models) + 1), 3.2), dpi=110, squeeze=False)
    for ax, model in zip(axes[0], models):
        mine = [r for r in rows if r["model"] == model and "(default)" not in r["sampler"]]
        for sampler in dict.fromkeys(r["sampler"].split(" ")[0] for r in mine):
            points = sorted((r["nfe"], r["fid"]) for r in mine if r["sampler"].split(" ")[0] == sampler)
            ax.plot(*zip(*points), marker="o", markersize=3, label=sampler)
        ax.axhline(baseline["fid"], color="k", linestyle="--", linewidth=0.8)
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.set_title(model, fontsize=9)
        ax.set_xlabel("NFE")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(f"FID ({result['feature_space']})")
    axes[0][0].legend(fontsize=6)
    ax = axes[0][-1]
    for model in models:
        mine = [r for r in rows if r["model"] == model]
        ax.scatter([r["images_per_s"] for r in mine], [r["fid"] for r in mine], s=8, label=model)
    ax.axhline(baseline["fid"], color="k", linestyle="--", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("images/s")
    ax.set_title("every setting", fontsize=9)
    ax.legend(fontsize=6)
    ax.grid(alpha=0.3)
    top = max(3 * baseline["fid"], 1.0)
    for a in axes[0]:
        a.set_ylim(0, top)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    run_script(main, parse_args)
