"""Tables and plots over run directories, in the style of the paper's Table 1 and Figs. 1, 2, 4.

    python -m lbsgd.report RUN_DIR [RUN_DIR ...] --out DIR

Reads each run's `config.json` and `metrics.jsonl`. Runs whose configs differ only in `seed`
(and in fields that do not shape training) are one setting, reported as mean +- std over the
seeds: finished runs only, one run per seed. A second finished run of the same config and seed
is a duplicate, listed on its own line and never averaged; an unfinished run (its last row
before the run's total steps, or no evaluation at that step) is listed on its own too. Writes
`report.md`, `report.html`, and PNG plots: training error and eval error vs epochs (Figs. 2
and 4), the learning-rate schedule vs iteration (drawn from each setting's config through
`lbsgd.optim.learning_rate_schedule`, at every step), final eval error vs kn (Fig. 1) when
settings differ in kn, and the gradient noise scale B_simple vs epochs with the runs' kn
marked, when runs measured it (`noise_scale_every_steps`). An unreadable or partial run is
listed with the reason, never fatal.
"""

import argparse
import dataclasses
import html
import json
import math
import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import jax  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

from lbsgd import noise_scale  # noqa: E402
from lbsgd.config import RUN_ONLY_FIELDS, with_defaults  # noqa: E402
from lbsgd.optim import learning_rate_schedule, scaled_learning_rate  # noqa: E402

NOT_A_SETTING = RUN_ONLY_FIELDS | {"seed", "resume_allow_changes"}


class RunError(ValueError):
    """A run directory that cannot be reported, with the reason."""


@dataclasses.dataclass
class Run:
    path: Path
    config: dict
    train: list[dict]  # rows with a training loss
    evals: list[dict]  # rows with eval_top1

    @property
    def seed(self):
        return self.config.get("seed")

    @property
    def steps_per_epoch(self) -> int:
        """Recovered from the rows: each has epoch = step / steps_per_epoch."""
        for row in self.train + self.evals:
            if row.get("epoch"):
                return round(row["step"] / row["epoch"])
        raise RunError("no row with epoch > 0: steps per epoch unknown")

    @property
    def total_steps(self) -> int:
        """As train.setup computes it: num_epochs epochs, cut to max_steps when that is set."""
        total = self.config["num_epochs"] * self.steps_per_epoch
        max_steps = self.config.get("max_steps", -1)
        return min(total, max_steps) if max_steps and max_steps > 0 else total

    @property
    def finished(self) -> bool:
        """The last row reached the total steps and there is an evaluation at that step."""
        last = max(r["step"] for r in self.train + self.evals)
        return last >= self.total_steps and self.evals[-1]["step"] >= self.total_steps


def load_run(path: Path) -> Run:
    try:
        config = with_defaults(json.loads((path / "config.json").read_text()))
        lines = (path / "metrics.jsonl").read_text().splitlines()
    except (OSError, json.JSONDecodeError) as error:
        raise RunError(f"cannot read config.json / metrics.jsonl: {error}") from None
    rows = []
    for number, line in enumerate(lines, 1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if number < len(lines):  # only a crash's last line may be torn
                raise RunError(f"metrics.jsonl line {number} is not JSON") from None
    train = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "eval_top1" in r]
    if not train or not evals:
        raise RunError(f"partial run: {len(train)} training rows, {len(evals)} eval rows")
    return Run(path, config, train, evals)


def setting_of(config: dict) -> str:
    return json.dumps({k: v for k, v in config.items() if k not in NOT_A_SETTING},
                      sort_keys=True)


def summarize(run: Run) -> dict[str, float]:
    """One run's numbers; errors are 1 - accuracy, as the paper reports them."""
    last_epoch = [r for r in run.train if r["epoch"] > run.train[-1]["epoch"] - 1]
    times = [r["time"] for r in run.train + run.evals if "time" in r]
    return {
        "final_error": 1 - run.evals[-1]["eval_top1"],
        "best_error": 1 - max(r["eval_top1"] for r in run.evals),
        "train_error": 1 - statistics.fmean(r["train_top1"] for r in last_epoch),
        "wall_minutes": (max(times) - min(times)) / 60 if len(times) > 1 else math.nan,
        "images_per_sec": statistics.median(r["images_per_sec"] for r in run.train),
    }


def _mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample std over the runs that have the value (NaN when none has it)."""
    values = [v for v in values if math.isfinite(v)]
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _label(config: dict, varying: list[str]) -> str:
    return ", ".join(f"{field}={config.get(field)}" for field in varying) or "all runs"


@dataclasses.dataclass
class Setting:
    """One setting's finished runs, one per seed (`runs`); `duplicates` are further finished
    runs of a seed already in `runs` (paired with that run), `unfinished` the rest."""
    label: str
    runs: list[Run]
    duplicates: list[tuple[Run, Run]] = dataclasses.field(default_factory=list)
    unfinished: list[Run] = dataclasses.field(default_factory=list)

    @property
    def config(self) -> dict:
        return (self.runs or self.unfinished)[0].config

    @property
    def legend(self) -> str:
        """The label with what a curve summarizes, e.g. "kn=1024, warmup=gradual, 3 seeds"."""
        c = self.config
        name = self.label if self.label != "all runs" else (
            f"kn={c['global_batch_size']}, {c['warmup']}")
        n = len(self.runs)
        return f"{name}, {n} seed{'s' if n != 1 else ''}"

    def stat(self, key: str) -> tuple[float, float]:
        return _mean_std([summarize(run)[key] for run in self.runs])


def group_settings(runs: list[Run]) -> list[Setting]:
    by_setting: dict[str, list[Run]] = {}
    for run in runs:
        by_setting.setdefault(setting_of(run.config), []).append(run)
    configs = [json.loads(key) for key in by_setting]
    varying = sorted({k for c in configs for k in c if any(d.get(k) != c.get(k) for d in configs)})
    settings = []
    for key, group in by_setting.items():
        setting = Setting(_label(json.loads(key), varying), [])
        by_seed: dict = {}
        for run in group:
            if not run.finished:
                setting.unfinished.append(run)
            elif run.seed in by_seed:
                setting.duplicates.append((run, by_seed[run.seed]))
            else:
                by_seed[run.seed] = run
                setting.runs.append(run)
        settings.append(setting)
    return sorted(settings, key=lambda s: (s.config["global_batch_size"], s.label))


def _cell(setting: Setting, key: str, scale: float = 100.0, digits: int = 2) -> str:
    mean, std = setting.stat(key)
    if not math.isfinite(mean):
        return "n/a"
    if len(setting.runs) == 1:
        return f"{mean * scale:.{digits}f}"
    return f"{mean * scale:.{digits}f} ± {std * scale:.{digits}f}"


COLUMNS = ("setting", "kn", "lr", "warmup", "momentum", "seeds", "final top-1 err. (%)",
           "best top-1 err. (%)", "train err., last epoch (%)", "wall (min)", "img/s")


def table_rows(settings: list[Setting]) -> list[list[str]]:
    rows = []
    for s in settings:
        if not s.runs:  # only unfinished runs: listed under "not averaged"
            continue
        c = s.config
        momentum = c["momentum_form"] + ("" if c["momentum_form"] == "eq9" else
                                         (" + correction" if c["momentum_correction"] else
                                          " no correction"))
        lr = scaled_learning_rate(c["base_lr"], c["global_batch_size"])
        rows.append([s.label, str(c["global_batch_size"]), f"{lr:g}", c["warmup"], momentum,
                     str(len(s.runs)), _cell(s, "final_error"), _cell(s, "best_error"),
                     _cell(s, "train_error"), _cell(s, "wall_minutes", 1.0, 1),
                     _cell(s, "images_per_sec", 1.0, 0)])
    return rows


def train_error_by_epoch(run: Run) -> tuple[list[float], list[float]]:
    """Training error per epoch (mean over the epoch's logged steps), as the paper plots it."""
    by_epoch: dict[int, list[float]] = {}
    for row in run.train:
        by_epoch.setdefault(math.ceil(row["epoch"]), []).append(1 - row["train_top1"])
    epochs = sorted(by_epoch)
    return epochs, [statistics.fmean(by_epoch[e]) * 100 for e in epochs]


def not_averaged(settings: list[Setting]) -> list[tuple[str, str]]:
    """Duplicates and unfinished runs: (path, what it is, with its own numbers)."""
    lines = []
    for s in settings:
        for run, first in s.duplicates:
            final = 100 * summarize(run)["final_error"]
            lines.append((str(run.path), f"{s.label}: duplicate of {first.path} (same config "
                          f"and seed {run.seed}), not averaged; final top-1 err. {final:.2f}%"))
        for run in s.unfinished:
            last = max(r["step"] for r in run.train + run.evals)
            error = 100 * (1 - run.evals[-1]["eval_top1"])
            lines.append((str(run.path), f"{s.label}: unfinished, seed {run.seed}, at step "
                          f"{last} of {run.total_steps}; last eval (step "
                          f"{run.evals[-1]['step']}) top-1 err. {error:.2f}%"))
    return lines


def learning_rate_curve(run: Run) -> tuple[np.ndarray, np.ndarray]:
    """The run's schedule at every step: x = step (updates done, as metrics rows count them),
    y = the rate that update used, learning_rate_schedule(config, S)(step - 1)."""
    config = ml_collections.ConfigDict(run.config)
    schedule = learning_rate_schedule(config, run.steps_per_epoch)
    t = np.arange(run.total_steps)
    return t + 1, np.asarray(jax.vmap(schedule)(t))


def eval_error_by_epoch(run: Run) -> tuple[list[float], list[float]]:
    """Eval top-1 error (%) at each evaluation's epoch."""
    return [r["epoch"] for r in run.evals], [100 * (1 - r["eval_top1"]) for r in run.evals]


def _save(fig, ax, path: Path, *, legend: bool = True) -> None:
    if legend:
        ax.legend(fontsize=7, loc="best")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_training_error(settings: list[Setting], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for s in settings:
        if not s.runs:
            continue
        curves = [train_error_by_epoch(run) for run in s.runs]  # finished: same epochs
        length = min(len(epochs) for epochs, _ in curves)
        mean = [statistics.fmean(c[1][i] for c in curves) for i in range(length)]
        ax.plot(curves[0][0][:length], mean, marker="o", markersize=2, label=s.legend)
    ax.set(xlabel="epoch", ylabel="training error (%)", title="Training error vs epochs")
    _save(fig, ax, path)


def eval_error_curves(settings: list[Setting]) -> dict[str, tuple[list[float], list[float]]]:
    """Per setting (by legend): epochs and the mean eval top-1 error (%) over its seeds."""
    curves = {}
    for s in settings:
        if not s.runs:
            continue
        per_run = [eval_error_by_epoch(run) for run in s.runs]
        length = min(len(epochs) for epochs, _ in per_run)
        curves[s.legend] = (per_run[0][0][:length],
                            [statistics.fmean(c[1][i] for c in per_run) for i in range(length)])
    return curves


def plot_eval_error(settings: list[Setting], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for legend, (epochs, errors) in eval_error_curves(settings).items():
        ax.plot(epochs, errors, marker="o", markersize=3, label=legend)
    ax.set(xlabel="epoch", ylabel="eval top-1 error (%)", title="Eval error vs epochs")
    _save(fig, ax, path)


def learning_rate_curves(settings: list[Setting]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per setting (by legend): the schedule of its config at every step."""
    return {s.legend: learning_rate_curve(s.runs[0]) for s in settings if s.runs}


def plot_learning_rate(settings: list[Setting], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4))
    for legend, (steps, lrs) in learning_rate_curves(settings).items():
        ax.plot(steps, lrs, drawstyle="steps-post", label=legend)  # one rate per step
    ax.set(xlabel="iteration", ylabel="learning rate", title="Learning rate vs iteration")
    _save(fig, ax, path)


def noise_scale_curves(settings: list[Setting]) -> dict[str, tuple[list[float], list[float]]]:
    """Per setting that measured it (by legend): epochs and B_simple, from the rows' running
    averages of |G|^2 and tr(Sigma), each averaged over the seeds before the ratio
    (McCandlish et al. 2018, App. A: never a mean of ratios). Steps where |G|^2 <= 0 are left
    out; so are steps not every seed logged."""
    curves = {}
    for s in settings:
        by_step: dict[int, list[dict]] = {}
        for run in s.runs:
            for row in run.train:
                if noise_scale.TRACE in row:
                    by_step.setdefault(row["step"], []).append(row)
        epochs, values = [], []
        for _, rows in sorted(by_step.items()):
            if len(rows) < len(s.runs):
                continue
            value = noise_scale.ratio(statistics.fmean(r[noise_scale.TRACE] for r in rows),
                                      statistics.fmean(r[noise_scale.GRAD_SQUARED] for r in rows))
            if math.isfinite(value):
                epochs.append(rows[0]["epoch"])
                values.append(value)
        if epochs:
            curves[s.legend] = (epochs, values)
    return curves


def plot_noise_scale(settings: list[Setting], path: Path) -> list[int]:
    """B_simple against epochs, with each setting's kn marked (dashed, the curve's colour):
    where a curve lies above a run's kn, that kn is below the critical batch size McCandlish
    et al. predict. Returns the kn marked; skipped ([]) when no run measured the noise scale."""
    curves = noise_scale_curves(settings)
    if not curves:
        return []
    fig, ax = plt.subplots(figsize=(7, 4.5))
    marked = set()
    for s in settings:
        if not s.runs:
            continue
        kn, color = s.config["global_batch_size"], None
        if s.legend in curves:
            epochs, values = curves[s.legend]
            color = ax.plot(epochs, values, marker="o", markersize=2, label=s.legend)[0].get_color()
        if kn not in marked:
            marked.add(kn)
            ax.axhline(kn, color=color or "gray", linestyle="--", linewidth=0.8)
            ax.annotate(f"kn = {kn}", (1, kn), xycoords=("axes fraction", "data"),
                        ha="right", va="bottom", fontsize=7, color=color or "gray")
    ax.set_yscale("log")
    ax.set(xlabel="epoch", ylabel="B_simple = tr(Σ) / |G|² (images)",
           title="Gradient noise scale vs epochs (dashed: the runs' kn)")
    _save(fig, ax, path)
    return sorted(marked)


def plot_error_vs_batch(settings: list[Setting], path: Path) -> bool:
    """Fig. 1 style: final error against kn over settings that differ only in kn and in the
    warmup that goes with it (the recipe at kn <= 256 needs none); skipped unless each kn
    appears once."""
    def rest(s: Setting) -> str:
        return setting_of({k: v for k, v in s.config.items()
                           if k not in ("global_batch_size", "warmup")})

    families: dict[str, list[Setting]] = {}
    for s in settings:
        families.setdefault(rest(s), []).append(s)
    family = [s for s in max(families.values(), key=len) if s.runs]
    sizes = [s.config["global_batch_size"] for s in family]
    if len(family) < 2 or len(set(sizes)) < len(sizes):
        return False
    family.sort(key=lambda s: s.config["global_batch_size"])
    stats = [s.stat("final_error") for s in family]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.errorbar([s.config["global_batch_size"] for s in family], [m * 100 for m, _ in stats],
                yerr=[d * 100 for _, d in stats], marker="o", capsize=3)
    ax.set_xscale("log", base=2)
    ax.set(xlabel="minibatch size kn", ylabel="final eval top-1 error (%)",
           title="Error vs minibatch size (linear scaling rule)")
    _save(fig, ax, path, legend=False)
    return True


def _markdown(rows: list[list[str]], problems: list[tuple[str, str]], plots: list[str],
              separate: list[tuple[str, str]] = ()) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + " --- |" * len(COLUMNS)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    if separate:
        lines += ["", "Not averaged (duplicates and unfinished runs):", ""]
        lines += [f"- `{p}`: {what}" for p, what in separate]
    if problems:
        lines += ["", "Runs left out:", ""] + [f"- `{p}`: {why}" for p, why in problems]
    lines += [""] + [f"![{name}]({name})" for name in plots]
    return "\n".join(lines) + "\n"


def _html(rows: list[list[str]], problems: list[tuple[str, str]], plots: list[str],
          separate: list[tuple[str, str]] = ()) -> str:
    def tr(cells, tag):
        return "<tr>" + "".join(f"<{tag}>{html.escape(c)}</{tag}>" for c in cells) + "</tr>"

    body = ["<table>", tr(COLUMNS, "th")] + [tr(row, "td") for row in rows] + ["</table>"]
    body += [f"<p>Not averaged: <code>{html.escape(p)}</code>: {html.escape(w)}</p>"
             for p, w in separate]
    body += [f"<p>Left out: <code>{html.escape(p)}</code>: {html.escape(w)}</p>"
             for p, w in problems]
    body += [f'<img src="{name}" alt="{name}">' for name in plots]
    return "<!doctype html><meta charset=utf-8><title>lbsgd report</title>\n" + "\n".join(body)


def write_report(run_dirs: list[Path], out: Path) -> dict:
    """Write report.md, report.html and the plots into `out`; return what was written."""
    out.mkdir(parents=True, exist_ok=True)
    runs, problems = [], []
    for path in run_dirs:
        try:
            runs.append(load_run(path))
        except RunError as error:
            problems.append((str(path), str(error)))
    settings = group_settings(runs) if runs else []
    plots = []
    if any(s.runs for s in settings):
        plot_training_error(settings, out / "training_error.png")
        plot_eval_error(settings, out / "eval_error.png")
        plot_learning_rate(settings, out / "learning_rate.png")
        plots = ["training_error.png", "eval_error.png", "learning_rate.png"]
        if plot_error_vs_batch(settings, out / "error_vs_batch.png"):
            plots.append("error_vs_batch.png")
        if plot_noise_scale(settings, out / "noise_scale.png"):
            plots.append("noise_scale.png")
    rows = table_rows(settings)
    separate = not_averaged(settings)
    (out / "report.md").write_text(_markdown(rows, problems, plots, separate))
    (out / "report.html").write_text(_html(rows, problems, plots, separate))
    return {"rows": rows, "problems": problems, "plots": plots, "not_averaged": separate,
            "settings": settings}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run directories (--workdir)")
    parser.add_argument("--out", type=Path, required=True, help="where the report goes")
    args = parser.parse_args(argv)
    result = write_report(args.runs, args.out)
    print(f"{len(result['rows'])} settings, {len(result['problems'])} runs left out, "
          f"{len(result['not_averaged'])} not averaged (duplicate or unfinished): "
          f"{args.out / 'report.md'}")


if __name__ == "__main__":
    main()
