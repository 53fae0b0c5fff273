"""The ablation table's rows and plots: one experiment's row (costs from the layout table, errors per
seed and their spread, training speed, Figure 3's measure) and the validation curves per group
(ablate.py writes the table)."""
from __future__ import annotations

import json
import statistics
from pathlib import Path

from ..config import replace
from ..model.columns import model_layout
from ..train import checkpoint as ckpt
from ..train.rundir import read_metrics
from .figures import colour_specificity, conv1_columns
from .run_pool import final_eval


def result_row(name: str, cfg, meta: dict, runs: list, rel_time) -> dict:
    """One table row: costs from the layout, errors (centre and ten patches) per seed and their
    spread, training speed, and Figure 3's colour specificity per column per seed."""
    rows = [final_eval(run, cfg.eval_batch_size) for run in runs]
    res = {"name": name, **_static(cfg, runs[0])}
    metrics = [read_metrics(run) for run in runs]
    seconds, colours = [], []
    for run, m in zip(runs, metrics):
        ck = ckpt.load(Path(run) / "checkpoint.pt")  # once a run: its working time and its conv1 kernels
        seconds.append(working_seconds(ck, m))
        colours.append(_colour(ck))
    speeds = [m[-1]["step"] * cfg.batch_size / t if m and t else None for m, t in zip(metrics, seconds)]
    res.update({
        "group": meta.get("group", ""),
        "step_time_rel_paper": rel_time,
        "seeds_done": len(runs),
        "top1_err": mean([r[1]["top1_err"] for r in rows]), "top5_err": mean([r[1]["top5_err"] for r in rows]),
        "top1_err_std": _std([r[1]["top1_err"] for r in rows]), "top5_err_std": _std([r[1]["top5_err"] for r in rows]),
        "ten_top1_err": mean([r[10]["top1_err"] for r in rows]),
        "ten_top5_err": mean([r[10]["top5_err"] for r in rows]),
        "ten_top1_err_std": _std([r[10]["top1_err"] for r in rows]),
        "per_seed": [{"top1_err": r[1]["top1_err"], "top5_err": r[1]["top5_err"],
                      "ten_top1_err": r[10]["top1_err"], "ten_top5_err": r[10]["top5_err"]} for r in rows],
        "steps": [m[-1].get("step") if m else None for m in metrics],
        "train_minutes": [t / 60 if t else None for t in seconds],
        "train_images_per_s": mean([v for v in speeds if v]),
        "colour_specificity": colours,
        "paper_delta_top1": meta.get("paper_delta_top1"), "paper_delta_top5": meta.get("paper_delta_top5"),
        "runs": [str(r) for r in runs],
    })
    return res


def working_seconds(ck: dict, metrics: list):
    """Seconds a run worked, over all its segments: its checkpoint's elapsed_s (TrainState; the time
    between an interruption and its resume is not in it), else (a checkpoint from before elapsed_s was
    recorded) the span of its metrics' time stamps."""
    state = ck.get("state", {})
    if "elapsed_s" in state:
        return float(state["elapsed_s"])
    stamps = [m["time"] for m in metrics if m["kind"] == "train" and "time" in m]
    return stamps[-1] - stamps[0] if len(stamps) > 1 else None


def _colour(ck: dict) -> list:
    """Figure 3's measure, mean colour specificity of each column's conv1 kernels (figures.py)."""
    model = ckpt.model_from_checkpoint(ck, devices="cpu")[0]
    return [float(colour_specificity(k).mean()) for k in conv1_columns(model)]


def _static(cfg, run) -> dict:
    """Costs from the layout table, for the number of classes the run was trained on."""
    classes = json.loads((Path(run) / "run.json").read_text())["classes"]
    mcfg = replace(cfg.model, num_classes=len(classes))
    lay = model_layout(mcfg.layout, mcfg)
    return {"layout": lay.name, "columns": lay.columns, "classes": len(classes), "params": lay.params(),
            "macs_per_image": lay.macs_per_image(),
            "exchange_bytes_per_image": sum(lay.exchange_bytes_per_image().values())}


def mean(v):
    return sum(v) / len(v) if v else None


def _std(v):
    return statistics.stdev(v) if len(v) > 1 else 0.0


def plots(out: Path, done: dict) -> None:
    import matplotlib  # here, not at the top: only plotting needs it (a slow import), Agg before pyplot
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    groups = {}
    for r in done.values():
        groups.setdefault(r["group"], []).append(r)
    for g, rows in groups.items():
        fig, ax = plt.subplots(figsize=(7, 4))
        for r in rows + ([done["paper"]] if "paper" in done and done["paper"] not in rows else []):
            ev = [m for m in read_metrics(r["runs"][0]) if m["kind"] == "eval"]
            if ev:
                ax.plot([m["step"] for m in ev], [m["val_top1_err"] for m in ev], "o-", ms=3, label=r["name"])
        ax.set_xlabel("step")
        ax.set_ylabel("validation top-1 error (centre, seed 0)")
        ax.set_ylim(0, 1)
        ax.set_title(g)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / f"curves_{g.replace(' ', '_')}.png", dpi=90)
        plt.close(fig)
