"""Tables and plots over run directories, in the style of the paper's Table 1 and Figs. 1, 2, 4.

    python -m lbsgd.report RUN_DIR [RUN_DIR ...] --out DIR

Reads each run's `config.json` and `metrics.jsonl`. Runs whose configs differ only in `seed`
(and in fields that do not shape training) are one setting, reported as mean +- std over the
seeds. Writes `report.md`, `report.html`, and PNG plots: training error vs epochs (Figs. 2
and 4), learning rate vs iteration, and final eval error vs kn (Fig. 1) when settings differ
in kn. An unreadable or partial run is listed with the reason, never fatal.
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
import matplotlib.pyplot as plt  # noqa: E402

from lbsgd.config import RUN_ONLY_FIELDS  # noqa: E402
from lbsgd.optim import scaled_learning_rate  # noqa: E402

NOT_A_SETTING = RUN_ONLY_FIELDS | {"seed", "resume_allow_changes"}


class RunError(ValueError):
    """A run directory that cannot be reported, with the reason."""


@dataclasses.dataclass
class Run:
    path: Path
    config: dict
    train: list[dict]  # rows with a training loss
    evals: list[dict]  # rows with eval_top1


def load_run(path: Path) -> Run:
    try:
        config = json.loads((path / "config.json").read_text())
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
    label: str
    runs: list[Run]

    @property
    def config(self) -> dict:
        return self.runs[0].config

    def stat(self, key: str) -> tuple[float, float]:
        return _mean_std([summarize(run)[key] for run in self.runs])


def group_settings(runs: list[Run]) -> list[Setting]:
    by_setting: dict[str, list[Run]] = {}
    for run in runs:
        by_setting.setdefault(setting_of(run.config), []).append(run)
    configs = [json.loads(key) for key in by_setting]
    varying = sorted({k for c in configs for k in c if any(d.get(k) != c.get(k) for d in configs)})
    settings = [Setting(_label(json.loads(key), varying), group)
                for key, group in by_setting.items()]
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


def _save(fig, ax, path: Path, *, legend: bool = True) -> None:
    if legend:
        ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_training_error(settings: list[Setting], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for s in settings:
        curves = [train_error_by_epoch(run) for run in s.runs]
        length = min(len(epochs) for epochs, _ in curves)
        mean = [statistics.fmean(c[1][i] for c in curves) for i in range(length)]
        ax.plot(curves[0][0][:length], mean, marker="o", markersize=2, label=s.label)
    ax.set(xlabel="epoch", ylabel="training error (%)", title="Training error vs epochs")
    _save(fig, ax, path)


def plot_learning_rate(settings: list[Setting], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4))
    for s in settings:
        run = s.runs[0]
        ax.plot([r["step"] for r in run.train], [r["lr"] for r in run.train], label=s.label)
    ax.set(xlabel="iteration", ylabel="learning rate", title="Learning rate vs iteration")
    _save(fig, ax, path)


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
    family = max(families.values(), key=len)
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


def _markdown(rows: list[list[str]], problems: list[tuple[str, str]], plots: list[str]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + " --- |" * len(COLUMNS)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    if problems:
        lines += ["", "Runs left out:", ""] + [f"- `{p}`: {why}" for p, why in problems]
    lines += [""] + [f"![{name}]({name})" for name in plots]
    return "\n".join(lines) + "\n"


def _html(rows: list[list[str]], problems: list[tuple[str, str]], plots: list[str]) -> str:
    def tr(cells, tag):
        return "<tr>" + "".join(f"<{tag}>{html.escape(c)}</{tag}>" for c in cells) + "</tr>"

    body = ["<table>", tr(COLUMNS, "th")] + [tr(row, "td") for row in rows] + ["</table>"]
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
    if settings:
        plot_training_error(settings, out / "training_error.png")
        plot_learning_rate(settings, out / "learning_rate.png")
        plots = ["training_error.png", "learning_rate.png"]
        if plot_error_vs_batch(settings, out / "error_vs_batch.png"):
            plots.append("error_vs_batch.png")
    rows = table_rows(settings)
    (out / "report.md").write_text(_markdown(rows, problems, plots))
    (out / "report.html").write_text(_html(rows, problems, plots))
    return {"rows": rows, "problems": problems, "plots": plots}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run directories (--workdir)")
    parser.add_argument("--out", type=Path, required=True, help="where the report goes")
    args = parser.parse_args(argv)
    result = write_report(args.runs, args.out)
    print(f"{len(result['rows'])} settings, {len(result['problems'])} runs left out: "
          f"{args.out / 'report.md'}")


if __name__ == "__main__":
    main()
