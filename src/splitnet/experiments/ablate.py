"""`splitnet ablate` / `make ablations`: the layer-split and component ablations, one results table.

Each experiment is a small TOML file in experiments/ablations/ (its header: question, the paper's
answer, command; the time, the same for each, is in _base.toml), applied on top of a base schedule: experiments/ablations/_base.toml on the
built-in data, experiments/paper.toml with --data (the full schedule on real data). Top-level keys
`group`, `paper_delta_top1`, `paper_delta_top5` describe the experiment and are not config fields.

For every experiment and seed the runner trains (or resumes) a run under OUT/runs/NAME-seedS, evaluates
the centre patch and the ten patches, and records parameters, multiply-adds and exchange bytes per
image (from the layout table) and the training step time relative to `paper`, measured in this
invocation on the same inputs, interleaved. OUT/ablations.json and OUT/ablations.md are rewritten
after each experiment; finished experiments are kept, so an interrupted run resumes where it stopped.
"""
from __future__ import annotations

import functools
import json
import logging
from pathlib import Path

from ..config import ConfigError, set_item, to_dict
from ..data import resolve_data
from ..formatting import pct
from ..train.config import apply_sets, load_config, read_toml
from ..train.loop import check_same_experiment
from ..train.rundir import read_metrics, run_done
from .ablation_rows import mean, plots, result_row
from .fig1 import figure1
from .locate import experiments_dir
from .run_pool import FINAL_EVAL, train_all  # noqa: F401 (FINAL_EVAL: importable from here, as before)
from .step_time import step_times

log = logging.getLogger("splitnet")

EXPERIMENTS = experiments_dir()  # $SPLITNET_EXPERIMENTS, the checkout, or the installed copy (locate.py)
ABLATIONS = EXPERIMENTS / "ablations"
# Top-level keys of an experiment file that describe it rather than configure the run. `geometries`:
# the scales at which the experiment means something (default: every one), e.g. 227-pixel crops
# only at the paper's.
META_KEYS = ("group", "paper_delta_top1", "paper_delta_top5", "geometries")
# A suite: the same experiment files over another base schedule. "ablations": the built-in data
# (experiments/ablations/_base.toml), or the paper's full recipe with --data (experiments/paper.toml).
# "cifar": the paper's network family at CIFAR-10 scale (experiments/cifar.toml); needs --data.
SUITES = ("ablations", "cifar")


def _base_path(suite: str, data) -> Path:
    if suite not in SUITES:
        raise ConfigError(f"--suite {suite!r}: not one of {', '.join(SUITES)}")
    if suite == "cifar":
        if not data:
            raise ConfigError("--suite cifar needs --data: CIFAR-10 (cifar-10-python.tar.gz, a folder "
                              "train/<class>/*, val/<class>/*, or a cache prepared with --image-size 32)")
        return EXPERIMENTS / "cifar.toml"
    return EXPERIMENTS / "paper.toml" if data else ABLATIONS / "_base.toml"


def experiment_names(suite: str = "ablations") -> list:
    """The experiments of `suite`, `paper` first: every file of experiments/ablations/ whose
    `geometries` (if given) include the suite's."""
    if not ABLATIONS.is_dir():
        raise FileNotFoundError(f"{ABLATIONS}: the ablation experiment files are missing (run from a checkout)")
    geometry = "cifar" if suite == "cifar" else "imagenet"
    names = []
    for p in sorted(ABLATIONS.glob("*.toml")):
        if p.stem.startswith("_"):
            continue
        if geometry in read_toml(p).get("geometries", [geometry]):
            names.append(p.stem)
    return ["paper"] + [n for n in names if n != "paper"]


def load_experiment(name: str, data=None, sets=(), suite: str = "ablations") -> tuple:
    """(TrainConfig, meta) of experiment `name`: the suite's base schedule + the file + --set."""
    path = ABLATIONS / f"{name}.toml"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such experiment (known: {', '.join(experiment_names())})")
    exp = read_toml(path)
    meta = {k: exp.pop(k) for k in META_KEYS if k in exp}
    base = read_toml(_base_path(suite, data))
    merged = {**base, **{k: v for k, v in exp.items() if not isinstance(v, dict)}}
    for table in ("model", "data", "optim"):
        if table in base or table in exp:
            merged[table] = {**base.get(table, {}), **exp.get(table, {})}
    merged["name"] = name
    extra = list(sets) + ([set_item("data.root", Path(data).resolve())] if data else [])
    return load_config(None, extra, base=merged), meta


def run_ablations(out, names=None, data=None, seeds: int = 1, sets=(), time_reps: int = 2,
                  suite: str = "ablations", jobs: int = 1) -> list:
    """Train and evaluate every experiment of `suite` (`names`: a subset) with `seeds` seeds under
    OUT/runs/NAME-seedS; write OUT/ablations.json and OUT/ablations.md after each experiment."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    names = list(names) if names else experiment_names(suite)
    results_path = out / "ablations.json"
    done = {r["name"]: r for r in json.loads(results_path.read_text())} if results_path.exists() else {}
    cfgs, metas = {}, {}
    for n in names:  # parse every file first: a bad one fails before hours of training
        cfgs[n], metas[n] = load_experiment(n, data, sets, suite)
    runs = {n: [out / "runs" / f"{n}-seed{s}" for s in range(seeds)] for n in names}
    seeded = {(n, s): load_config(None, [f"seed={s}"], base=to_dict(cfgs[n])) for n in names for s in range(seeds)}
    for (n, s), cfg in seeded.items():  # a run of an experiment file edited since: refuse, before any training
        check_same_experiment(runs[n][s], cfg)
    timed = {n: r["step_time_rel_paper"] for n, r in done.items() if r.get("step_time_rel_paper")}
    to_time = {n: c for n, c in cfgs.items() if n not in timed}
    paper_cfg = cfgs.get("paper") or load_experiment("paper", data, sets, suite)[0]
    if to_time:  # before any training, so that nothing else runs while it times
        timed.update(step_times(paper_cfg, to_time, reps=time_reps))
    # Done is what the run directories say, not the table: a deleted run is trained again
    tasks = [(n, seeded[n, s], run) for n in names for s, run in enumerate(runs[n]) if not run_done(run, cfgs[n])]
    todo = [n for n in names if n not in done or any(t[0] == n for t in tasks)]
    for n in names:
        if n not in todo:
            log.info("ablate: %s already done; kept", n)
            done[n]["step_time_rel_paper"] = timed[n]  # re-timed when its row had no step time
    left = {n: sum(1 for t in tasks if t[0] == n) for n in todo}

    def finish(n):
        done[n] = result_row(n, cfgs[n], metas[n], runs[n], timed.get(n))
        _write(out, done, data, suite, paper_cfg, names)

    for n in todo:
        if not left[n]:
            finish(n)

    def on_done(n):
        left[n] -= 1
        if not left[n]:
            finish(n)

    train_all(tasks, jobs, on_done)
    _write(out, done, data, suite, paper_cfg, names)
    plots(out, done)
    return [done[n] for n in names if n in done]


def run_figure1(out, data=None, sets=(), suite: str = "ablations", **kw) -> dict:
    """Figure 1 (fig1.py) on the suite's training set at 32x32; kept if OUT/figure1.json exists."""
    out = Path(out)
    if (out / "figure1.json").exists():
        return json.loads((out / "figure1.json").read_text())
    cfg, _ = load_experiment("paper", data, sets, suite)
    cache, _ = resolve_data(cfg.data)
    res = figure1(cache, out, **kw)
    _append_figure1(out, res)
    return res


def _append_figure1(out: Path, res: dict) -> None:
    r, t = res["acts"]["relu"], res["acts"]["tanh"]
    ratio = res["ratio_tanh_over_relu"]
    if ratio:
        ratio_text = f"{ratio:.1f}"
    elif res.get("ratio_at_least"):
        ratio_text = f"more than {res['ratio_at_least']:.1f} (tanh did not reach the target in {res['max_epochs']} epochs)"
    else:
        ratio_text = f"n/a (ReLU did not reach the target in {res['max_epochs']} epochs)"
    speed = (f" Training speed: ReLU {r['images_per_s']:.0f}, tanh {t['images_per_s']:.0f} images/s; "
             f"{res['minutes']:.0f} minutes in all." if "minutes" in res else "")
    text = (f"\n## Figure 1: ReLU vs tanh, four-layer CNN, {res['side']}x{res['side']} images\n\n"
            f"Epochs to reach {100 * res['target_train_err']:.0f}% training error ({res['images']} images, "
            f"no regularisation, init {res.get('init', 'torch')!r}, training error "
            f"{res.get('train_error', 'full')!r}; each activation with the learning rate that trained "
            f"fastest in a short search): ReLU {r['epochs']} (lr {r['lr']}), tanh {t['epochs']} (lr {t['lr']}); "
            f"ratio {ratio_text}. The paper: six times faster with ReLUs on CIFAR-10.{speed}\n\n"
            f"![Figure 1](figure1.png)\n")
    md = out / "ablations.md"
    md.write_text((md.read_text() if md.exists() else "") + text)



# What each suite's base file sets; the data, batch and budget are read from the run's own config.
_SUITE_LINE = {
    "ablations": "experiments/ablations/_base.toml",
    "cifar": "experiments/cifar.toml: the paper's network family at CIFAR scale (24x24 crops of 32x32 images, "
             "narrower layers)",
}


def _setting(cfg) -> str:
    """Batch and budget as the experiments trained (an experiment file or --set may change them)."""
    budget = [f"{cfg.epochs} epochs"]
    if cfg.max_steps:
        budget.append(f"at most {cfg.max_steps} steps")
    if cfg.max_minutes:
        budget.append(f"at most {cfg.max_minutes:g} minutes")
    return f"batch {cfg.batch_size}, " + ", ".join(budget)


def _data_line(data, suite: str, cfg) -> str:
    if data:
        base = "experiments/paper.toml (the full paper schedule)" if suite == "ablations" else _SUITE_LINE[suite]
        return f"`{data}`, {base}; {_setting(cfg)}"
    what = ("the built-in synthetic set (10 classes; chance 90% top-1)" if suite == "ablations"
            else "the suite's default data")
    return f"{what}, {_SUITE_LINE[suite]}; {_setting(cfg)}"


_pct = functools.partial(pct, unit="")  # the table's cells: the column heads say "%"


def _delta(r: dict, base: dict | None) -> str:
    """Ten-patch top-1 / top-5 error minus the baseline's, % points; "(unresolved)" when the top-1
    difference is smaller than twice the larger of the two seed spreads."""
    if not base or r["name"] == base["name"]:
        return "-"
    d1 = r["ten_top1_err"] - base["ten_top1_err"]
    d5 = r["ten_top5_err"] - base["ten_top5_err"]
    spread = max(r.get("ten_top1_err_std") or 0.0, base.get("ten_top1_err_std") or 0.0)
    tag = " (unresolved)" if r.get("seeds_done", 1) > 1 and abs(d1) < 2 * spread else ""
    return f"{100 * d1:+.1f} / {100 * d5:+.1f}{tag}"


def _write(out: Path, done: dict, data, suite: str = "ablations", cfg=None, asked=()) -> None:
    """ablations.md and ablations.json of the rows `done`; `cfg`: the paper experiment's config (the
    data line's batch and budget), `asked`: every experiment of the invocation (those missing are named)."""
    order = [n for n in experiment_names(suite) if n in done]
    rows = [done[n] for n in order + [n for n in done if n not in order]]
    tmp = out / ".ablations.json.tmp"
    tmp.write_text(json.dumps(rows, indent=2))
    tmp.replace(out / "ablations.json")
    base = done.get("paper")
    where = _data_line(data, suite, cfg or load_experiment("paper", data, (), suite)[0])
    lines = [
        "# Ablations" + (" at CIFAR-10 scale" if suite == "cifar" else ""),
        "",
        f"Data: {where}. Errors on the validation set, mean over seeds, +/- the seeds' standard deviation. "
        "Step time: one training step of the experiment's model relative to `paper`, same input, measured "
        "in one process before training. Images/s: training throughput of the runs themselves. Delta: the "
        "experiment's ten-patch top-1 / top-5 error minus `paper`'s, in % points (+ = worse), beside the "
        "paper's; (unresolved) when the top-1 difference is smaller than twice the larger seed spread. "
        "Every error is that of the final weights (checkpoint.pt), except `best epoch`: the lowest centre "
        "top-1 error of the per-epoch evaluations (the weights kept in best.pt), mean over seeds.",
        "",
        "| experiment | group | columns | params | MACs/image | exchange B/image | step time vs paper | "
        "train images/s | top-1 err (centre) | best epoch top-1 (centre) | top-5 err (centre) | "
        "top-1 err (10 patches) | top-5 err (10 patches) | delta top-1 / top-5 | paper's delta |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [_table_line(r, base) for r in rows]
    chance = [r["name"] for r in rows if r["top1_err"] >= 1 - 1 / r.get("classes", 10) - 0.05]
    if chance:
        lines += ["", f"Near chance (centre top-1 error within 5 points of 1 - 1/classes): {', '.join(chance)}. "
                  "These runs had not left the initial plateau of the paper's init within the budget, so "
                  "their errors say nothing about the ablated component; the cost columns (parameters, "
                  "MACs, exchange bytes, step time) hold regardless."]
    missing = [n for n in asked if n not in done]
    if missing:
        lines += ["", f"Not finished (an interrupted invocation; the same command resumes them): {', '.join(missing)}."]
    lines += ["", f"Seeds per experiment: {', '.join(str(r['seeds_done']) for r in rows)}; "
              f"training steps: {', '.join(str(r['steps']) for r in rows)}."]
    colour = [r for r in rows if r.get("colour_specificity")]
    if colour:
        lines += ["", "Figure 3's measure per run (mean colour specificity of each column's conv1 kernels, "
                  "0 = grey, 2/3 = random): " + "; ".join(
                      f"{r['name']} " + ", ".join("/".join(f"{v:.2f}" for v in seed) for seed in r["colour_specificity"])
                      for r in colour) + "."]
    lines += ["", "Validation error curves per group: " + ", ".join(
        f"![{g}](curves_{g.replace(' ', '_')}.png)" for g in sorted({r['group'] for r in rows}))]
    (out / "ablations.md").write_text("\n".join(lines) + "\n")
    if (out / "figure1.json").exists():
        _append_figure1(out, json.loads((out / "figure1.json").read_text()))


def _table_line(r: dict, base) -> str:
    """One row of ablations.md's table (`base`: the paper row, for the delta)."""
    pd = "-"
    if r.get("paper_delta_top1") is not None:
        pd = f"{r['paper_delta_top1']:+.1f}" + (f" / {r['paper_delta_top5']:+.1f}"
                                               if r.get("paper_delta_top5") is not None else "")
    st = f"{r['step_time_rel_paper']:.2f}" if r.get("step_time_rel_paper") else "-"
    ips = f"{r['train_images_per_s']:.0f}" if r.get("train_images_per_s") else "-"
    return (f"| {r['name']} | {r['group']} | {r['columns']} | {r['params']:,} | "
            f"{r['macs_per_image'] / 1e6:.1f} M | {r['exchange_bytes_per_image']:,} | {st} | {ips} | "
            f"{_pct(r['top1_err'], r['top1_err_std'])} | {_pct(_best_centre(r))} | "
            f"{_pct(r['top5_err'], r['top5_err_std'])} | "
            f"{_pct(r['ten_top1_err'], r.get('ten_top1_err_std'))} | {_pct(r['ten_top5_err'])} | "
            f"{_delta(r, base)} | {pd} |")


def _best_centre(row: dict):
    """Mean over the row's runs of the lowest per-epoch centre top-1 error in their metrics."""
    best = [min((m["val_top1_err"] for m in read_metrics(run) if m["kind"] == "eval"), default=None)
            for run in row.get("runs", [])]
    return mean([b for b in best if b is not None]) if any(b is not None for b in best) else None


# ---- command line -------------------------------------------------------------------------------
def register(sub) -> None:
    p = sub.add_parser("ablate", help="train and evaluate the ablations; one results table")
    p.add_argument("--out", help="results folder (needed unless --list)")
    p.add_argument("--suite", default="ablations", choices=SUITES,
                   help="ablations: the paper's scale (built-in data, or --data with the full schedule); "
                        "cifar: the network family at CIFAR-10 scale (experiments/cifar.toml; needs --data)")
    p.add_argument("--data", help="a folder of class folders, a prepared cache, or (cifar) cifar-10-python.tar.gz")
    p.add_argument("--only", nargs="+", metavar="NAME", help="these experiments only (default: all)")
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument("--jobs", type=int, default=1,
                   help="train this many runs at once, each with cores/jobs threads (small networks: 2)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override for every experiment, e.g. max_steps=20")
    p.add_argument("--time-reps", type=int, default=2,
                   help="interleaved step pairs per experiment for the step-time column (median)")
    p.add_argument("--list", action="store_true", help="list the suite's experiments and exit")
    fig = p.add_mutually_exclusive_group()
    fig.add_argument("--no-figure1", action="store_true", help="skip the Figure 1 measurement (ReLU vs tanh)")
    fig.add_argument("--figure1-only", action="store_true",
                     help="Figure 1 alone, on the suite's training set: no ablation runs")
    p.set_defaults(func=_main)


def _main(args) -> int:
    if args.list:
        for n in experiment_names(args.suite):
            meta = {k: v for k, v in read_toml(ABLATIONS / f"{n}.toml").items() if k in META_KEYS}
            print(f"{n:<18} {meta.get('group', '')}")
        return 0
    if not args.out:
        raise ConfigError("ablate: --out DIR is needed")
    rows = [] if args.figure1_only else run_ablations(args.out, args.only, args.data, args.seeds, args.sets,
                                                        time_reps=args.time_reps, suite=args.suite, jobs=args.jobs)
    if not args.no_figure1:
        run_figure1(args.out, args.data, args.sets, suite=args.suite)
    print((Path(args.out) / "ablations.md").read_text())
    return 0 if rows or args.figure1_only else 1


__all__ = ["run_ablations", "load_experiment", "experiment_names", "apply_sets", "SUITES"]
