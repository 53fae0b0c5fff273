"""`splitnet reproduce`: the paper's pipeline end to end (data, training §5, evaluation §4.1/§6,
Figures 3 and 4), written up as DIR/report.md beside the paper's numbers.

With no data it uses the built-in synthetic set and experiments/reproduce.toml (a short CPU schedule;
the file says what differs from the paper and why). With --data ROOT it uses experiments/paper.toml,
the paper's full recipe, on that folder of class folders (ImageNet), on two GPUs when present.
Re-running the same command resumes: the run's checkpoint is reused, finished stages are not redone.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import set_item
from ..data import resolve_data
from ..formatting import pct
from ..model.placement import describe
from ..train import checkpoint as ckpt
from ..train.config import load_config
from ..train.evaluate import evaluate_checkpoints, format_rows
from ..train.loop import train_or_resume
from ..train.rundir import read_metrics
from .figures import figure3, figure4, training_curves
from .locate import experiments_dir

log = logging.getLogger("splitnet")

EXPERIMENTS = experiments_dir()  # $SPLITNET_EXPERIMENTS, the checkout, or the installed copy (locate.py)

# The paper's numbers (§6: Tables 1 and 2, and the centre-patch footnote). Top-1 / top-5 error in %.
PAPER = [
    ("ILSVRC-2010 test, one centre patch (footnote)", "centre", 39.0, 18.3),
    ("ILSVRC-2010 test, 10 patches (Table 1)", "ten", 37.5, 17.0),
    ("ILSVRC-2012 val, 1 CNN (Table 2)", "ten", 40.7, 18.2),
    ("ILSVRC-2012 val, 5 CNNs averaged (Table 2)", "ensemble", 38.1, 16.4),
]


def experiment_file(name: str) -> Path:
    path = EXPERIMENTS / name
    if not path.is_file():
        raise FileNotFoundError(f"{path}: experiment file not found (run from a checkout of splitnet)")
    return path


def reproduce(out, data=None, config=None, sets=(), seeds: int = 1) -> Path:
    """Train (or resume), evaluate, draw the figures, write OUT/report.md; returns its path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg_path = Path(config) if config else experiment_file("paper.toml" if data else "reproduce.toml")
    sets = list(sets) + ([set_item("data.root", Path(data).resolve())] if data else [])
    t0 = time.time()
    runs = []
    for seed in range(seeds):
        run_dir = out / ("run" if seeds == 1 else f"run-seed{seed}")
        s = sets + ([f"seed={seed}"] if seeds > 1 else [])
        summary = train_or_resume(load_config(cfg_path, s), run_dir, progress=True)
        if summary.get("status") == "interrupted":
            raise KeyboardInterrupt
        runs.append(run_dir)
    train_minutes = (time.time() - t0) / 60
    ck = ckpt.load(runs[0] / "checkpoint.pt")
    model, cfg, classes = ckpt.model_from_checkpoint(ck)
    cache, data_desc = resolve_data(cfg.data)

    t1 = time.time()
    rows = evaluate_checkpoints(runs, split="val", ten=True, batch_size=cfg.eval_batch_size)
    (out / "eval.json").write_text(json.dumps(rows, indent=2))
    eval_minutes = (time.time() - t1) / 60

    fig_dir = out / "figures"
    fig3 = figure3(model, fig_dir / "figure3_conv1_kernels.png")
    fig4 = figure4(model, cache, fig_dir / "figure4_predictions_neighbours.png", cfg.data,
                   batch_size=cfg.eval_batch_size)
    metrics = read_metrics(runs[0])
    training_curves(metrics, fig_dir / "training_curves.png")
    run_info = json.loads((runs[0] / "run.json").read_text())
    text = _report(ReportFacts(cfg, cfg_path, runs, rows, fig3, fig4, metrics, run_info, data_desc, classes,
                               model, train_minutes, eval_minutes))
    path = out / "report.md"
    path.write_text(text)
    (out / "summary.json").write_text(json.dumps({"eval": rows, "figure3": fig3, "figure4": fig4,
                                                  "chance_top1_err": 1 - 1 / len(classes)}, indent=2))
    log.info("reproduce: wrote %s", path)
    return path


def _caps(cfg) -> str:
    """" (capped at 486 steps or 45 minutes, whichever comes first)", or "" for an uncapped run."""
    caps = ([f"{cfg.max_steps} steps"] if cfg.max_steps else []) + (
        [f"{cfg.max_minutes:g} minutes"] if cfg.max_minutes else [])
    return f" (capped at {' or '.join(caps)}{', whichever comes first' if len(caps) > 1 else ''})" if caps else ""


def _best_line(run: Path, final: dict | None) -> str:
    """Final and best weights side by side; the table above is the final weights'."""
    best = Path(run) / "best.pt"
    head = "The table gives the final weights (`checkpoint.pt`)."
    if not best.exists() or final is None:
        return head + " No `best.pt` (no validation evaluation during training)."
    ck = ckpt.load(best)
    b = ck["state"]["best"]
    return (f"{head} The best validation evaluation during training (`best.pt`, after epoch {b['epoch']}, "
            f"step {b['step']}) had a centre top-1 error of {pct(b['val_top1_err'])}; the final weights have "
            f"{pct(final['top1_err'])}.")


@dataclass(frozen=True)
class ReportFacts:
    """What report.md is written from: the run's config and file, the runs, the evaluation rows, the
    figures' measures, the first run's metrics and run.json, the data, the model and the times."""

    cfg: object
    cfg_path: Path
    runs: list
    rows: list
    fig3: dict
    fig4: dict
    metrics: list
    run_info: dict
    data_desc: str
    classes: list
    model: object
    train_minutes: float
    eval_minutes: float

    @property
    def chance(self) -> tuple:
        """Top-1 and top-5 error of guessing, on this data."""
        return 1 - 1 / len(self.classes), max(0.0, 1 - 5 / len(self.classes))


def _report(f: ReportFacts) -> str:
    lines = [
        "# splitnet reproduction report",
        "",
        f"Written {time.strftime('%Y-%m-%d %H:%M')} by `splitnet reproduce`; commit `{f.run_info.get('commit')}`.",
        "",
        *_what_ran(f),
        "",
        *_results(f),
        "",
        *_figure3_section(f.fig3),
        "",
        "## Figure 4: predictions and nearest neighbours in the last hidden layer",
        "",
        "![Figure 4](figures/figure4_predictions_neighbours.png)",
        "",
        f"Of the query images' 6 nearest training images by fc7 distance, "
        f"{pct(f.fig4['neighbours_same_class'])} share the query's class "
        f"(searched {f.fig4['searched_train_images']} training images).",
        "",
        "## Training curves",
        "",
        "![curves](figures/training_curves.png)",
        "",
        "## All evaluations",
        "",
        format_rows(f.rows),
    ]
    return "\n".join(lines) + "\n"


def _what_ran(f: ReportFacts) -> list:
    """The "What ran" section: data, network, schedule, departures, devices, speed, runs."""
    cfg, model, info = f.cfg, f.model, f.run_info
    tr = [m for m in f.metrics if m.get("kind") == "train"]
    ips = sorted(m["images_per_s"] for m in tr[len(tr) // 10:]) if tr else []
    med_ips = ips[len(ips) // 2] if ips else float("nan")
    chance1, chance5 = f.chance
    ex = model.layout.exchange_bytes_per_image()
    lines = [
        "## What ran",
        "",
        f"- **Data:** {f.data_desc}: {info.get('train_images')} training and {info.get('val_images')} "
        f"validation images in {len(f.classes)} classes (chance: top-1 error {pct(chance1)}, top-5 "
        f"{pct(chance5)}).",
        f"- **Network:** layout `{model.layout.name}` ({model.layout.params():,} parameters), "
        f"{cfg.model.input_mode} input, LRN {'on' if cfg.model.lrn else 'off'} ({cfg.model.lrn_convention} "
        f"convention, k={cfg.model.lrn_k}), dropout {cfg.model.dropout} ({cfg.model.dropout_mode}), init "
        f"N(0, {cfg.model.init_std}^2) with biases {cfg.model.init_bias}.",
        f"- **Schedule:** `{f.cfg_path.name}`: batch {cfg.batch_size}, {cfg.epochs} epochs"
        + _caps(cfg)
        + f", eps {cfg.optim.lr} ({cfg.optim.schedule} schedule), momentum {cfg.optim.momentum}, "
        f"weight decay {cfg.optim.weight_decay}; {tr[-1]['step'] if tr else 0} steps in "
        f"{1 + (tr[-1]['epoch'] if tr else 0)} epochs, {f.train_minutes:.1f} min (this invocation).",
    ]
    if cfg.note:
        lines.append(f"- **Departures from the paper's recipe, and why:** {cfg.note.strip()}")
    lines += [
        f"- **Devices:** {describe(model.devices)} (training ran on {', '.join(info.get('devices', []))}); "
        f"{info.get('threads')} CPU threads; torch {torch.__version__}.",
        f"- **Speed:** median {med_ips:.1f} training images/s; exchanges {sum(ex.values()):,} bytes per image "
        f"forward (" + ", ".join(f"{k} {v:,}" for k, v in ex.items()) + "), the same backward.",
        f"- **Runs:** {', '.join(f'`{r}`' for r in f.runs)}; evaluation took {f.eval_minutes:.1f} min.",
    ]
    return lines


def _results(f: ReportFacts) -> list:
    """The results table beside the paper's, the per-epoch validation errors, final vs best weights."""
    chance1, chance5 = f.chance
    by = {(r["model"], r["patches"]): r for r in f.rows}
    one = str(f.runs[0])
    ours = {"centre": by.get((one, 1)), "ten": by.get((one, 10)),
            "ensemble": by.get((f"ensemble of {len(f.runs)}", 10)) if len(f.runs) > 1 else None}
    lines = [
        "## Results beside the paper's",
        "",
        "Error rates in %. The paper's numbers are on ImageNet (1000 classes); ours are on the data named"
        " above, so they compare only when that data is ImageNet.",
        "",
        "| quantity | paper top-1 | paper top-5 | ours top-1 | ours top-5 | ours: what |",
        "|---|---|---|---|---|---|",
    ]
    for name, kind, p1, p5 in PAPER:
        r = ours.get(kind)
        what = {"centre": "centre patch, 1 CNN", "ten": "10 patches, 1 CNN",
                "ensemble": f"10 patches, {len(f.runs)} CNNs averaged"}[kind]
        if r is None:
            lines.append(f"| {name} | {p1} | {p5} | - | - | not run (needs several seeds: --seeds N) |")
        else:
            lines.append(f"| {name} | {p1} | {p5} | {100 * r['top1_err']:.1f} | {100 * r['top5_err']:.1f} | "
                         f"{what}, {r['images']} val images |")
    lines.append(f"| chance on our data | | | {100 * chance1:.1f} | {100 * chance5:.1f} | |")
    ev = [m for m in f.metrics if m.get("kind") == "eval"]
    if ev:
        lines += ["", "Validation error (centre patch) after each evaluated epoch: "
                  + ", ".join(f"epoch {m['epoch']}: {pct(m['val_top1_err'])}" for m in ev) + "."]
    return lines + ["", _best_line(f.runs[0], by.get((one, 1)))]


def _figure3_section(fig3: dict) -> list:
    c0, c1 = fig3.get("column_0_colour_specificity"), fig3.get("column_1_colour_specificity")
    lines = [
        "## Figure 3: the conv1 kernels of the two columns",
        "",
        "![Figure 3](figures/figure3_conv1_kernels.png)",
        "",
        "Column 0's 48 kernels above column 1's 48. Colour specificity (share of a kernel's energy that"
        " is not grey; 0 = colour-agnostic, about 0.67 for random weights):"
        + (f" column 0: **{c0:.3f}**, column 1: **{c1:.3f}**." if c1 is not None else f" column 0: {c0:.3f}."),
    ]
    if c1 is not None:
        verdict = ("one column is clearly more colour-agnostic than the other, as the paper reports"
                   if abs(c0 - c1) > 0.1 else
                   "the two columns do not differ clearly: the paper's specialisation (§6.1) is not "
                   "reproduced by this run")
        lines.append(f"Here {verdict} (difference {abs(c0 - c1):.3f}).")
    return lines


# ---- command line -------------------------------------------------------------------------------
def register(sub) -> None:
    p = sub.add_parser("reproduce", help="the paper's pipeline end to end, with a report")
    p.add_argument("--out", required=True, help="output folder (report.md, figures, runs)")
    p.add_argument("--data", help="a folder of class folders (ImageNet layout); default: the built-in set")
    p.add_argument("--config", help="override the experiment file")
    p.add_argument("--seeds", type=int, default=1, help="train this many models (ensemble rows)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    p.set_defaults(func=_main)


def _main(args) -> int:
    path = reproduce(args.out, args.data, args.config, args.sets, args.seeds)
    print(f"report: {path}")
    return 0
