"""`splitnet ablate` / `make ablations`: the layer-split and component ablations, one results table.

Each experiment is a small TOML file in experiments/ablations/ (its header: question, the paper's
answer, command, time), applied on top of a base schedule: experiments/ablations/_base.toml on the
built-in data, experiments/paper.toml with --data (the full schedule on real data). Top-level keys
`group`, `paper_delta_top1`, `paper_delta_top5` describe the experiment and are not config fields.

For every experiment and seed the runner trains (or resumes) a run under OUT/runs/NAME-seedS, evaluates
the centre patch and the ten patches, and records parameters, multiply-adds and exchange bytes per
image (from the layout table) and the training step time relative to `paper`, measured in this
invocation on the same inputs, interleaved. OUT/ablations.json and OUT/ablations.md are rewritten
after each experiment; finished experiments are kept, so an interrupted run resumes where it stopped.
"""
from __future__ import annotations

import json
import logging
import statistics
import time
import tomllib
from pathlib import Path

import torch
import torch.nn.functional as F

from . import checkpoint as ckpt
from .evaluate import evaluate_checkpoints
from .runconfig import apply_sets, load_config
from .train import read_metrics, train

log = logging.getLogger("splitnet")

EXPERIMENTS = Path(__file__).resolve().parents[2] / "experiments"
ABLATIONS = EXPERIMENTS / "ablations"
META_KEYS = ("group", "paper_delta_top1", "paper_delta_top5")


def experiment_names() -> list:
    if not ABLATIONS.is_dir():
        raise FileNotFoundError(f"{ABLATIONS}: the ablation experiment files are missing (run from a checkout)")
    names = sorted(p.stem for p in ABLATIONS.glob("*.toml") if not p.stem.startswith("_"))
    return ["paper"] + [n for n in names if n != "paper"]


def load_experiment(name: str, data=None, sets=()) -> tuple:
    """(TrainConfig, meta) of experiment `name`: base schedule + the experiment file + --set."""
    path = ABLATIONS / f"{name}.toml"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such experiment (known: {', '.join(experiment_names())})")
    try:
        exp = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        from .config import ConfigError
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    meta = {k: exp.pop(k) for k in META_KEYS if k in exp}
    base_path = EXPERIMENTS / "paper.toml" if data else ABLATIONS / "_base.toml"
    base = tomllib.loads(base_path.read_text())
    merged = {**base, **{k: v for k, v in exp.items() if not isinstance(v, dict)}}
    for table in ("model", "data", "optim"):
        if table in base or table in exp:
            merged[table] = {**base.get(table, {}), **exp.get(table, {})}
    merged["name"] = name
    extra = list(sets) + ([f'data.root="{Path(data).resolve()}"'] if data else [])
    return load_config(None, extra, base=merged), meta


def _timing_model(cfg):
    from .model import SplitAlexNet
    torch.manual_seed(0)
    m = SplitAlexNet(num_classes=10, config=cfg.model, devices=tuple(cfg.devices) or None,
                     concurrency=cfg.concurrency).train()
    b = cfg.batch_size
    x, y = torch.randn(b, 3, m.input_side, m.input_side) * 60, torch.randint(0, 10, (b,))
    return m, x.to(m.devices[0]), y.to(m.devices[m.layout.head])


def _step(m, x, y) -> float:
    t0 = time.perf_counter()
    m.zero_grad(set_to_none=True)
    F.cross_entropy(m(x), y).backward()
    return time.perf_counter() - t0


def step_times(paper_cfg, cfgs: dict, reps: int = 2) -> dict:
    """Training step time (forward, loss, backward) of each config's model relative to the paper's,
    each timed interleaved with the paper model on same-sized random batches, in this process
    (median of `reps` after a warm-up). Two models in memory at a time."""
    paper = _timing_model(paper_cfg)
    _step(*paper)
    rel = {}
    for name, cfg in cfgs.items():
        if name == "paper":
            rel[name] = 1.0
            continue
        other = _timing_model(cfg)
        _step(*other)
        tp, to = [], []
        for _ in range(reps):
            tp.append(_step(*paper))
            to.append(_step(*other))
        rel[name] = statistics.median(to) / statistics.median(tp)
        del other
    return rel


def run_ablations(out, names=None, data=None, seeds: int = 1, sets=(), time_reps: int = 2) -> list:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    names = list(names) if names else experiment_names()
    results_path = out / "ablations.json"
    done = {r["name"]: r for r in json.loads(results_path.read_text())} if results_path.exists() else {}
    cfgs, metas = {}, {}
    for n in names:  # parse every file first: a bad one fails before hours of training
        cfgs[n], metas[n] = load_experiment(n, data, sets)
    timed = {n: r["step_time_rel_paper"] for n, r in done.items() if r.get("step_time_rel_paper")}
    to_time = {n: c for n, c in cfgs.items() if n not in timed}
    if to_time:
        paper_cfg = cfgs.get("paper") or load_experiment("paper", data, sets)[0]
        timed.update(step_times(paper_cfg, to_time, reps=time_reps))
    for n in names:
        if n in done and done[n].get("seeds_done", 0) >= seeds:
            log.info("ablate: %s already done; kept", n)
            continue
        cfg = cfgs[n]
        runs = []
        for seed in range(seeds):
            run = out / "runs" / f"{n}-seed{seed}"
            s = [f"seed={seed}"]
            if (run / "checkpoint.pt").exists():
                ck = ckpt.load(run / "checkpoint.pt")
                finished = int(ck["epoch"]) >= cfg.epochs or (cfg.max_steps and int(ck["step"]) >= cfg.max_steps)
                stopped = any(m.get("at_stop") for m in read_metrics(run) if m["kind"] == "eval")
                if not (finished or stopped):
                    train(out=run, resume=True, sets=s, progress=False)
            else:
                seeded = load_config(None, s, base=_as_dict(cfg))
                summary = train(seeded, run)
                if summary["status"] == "interrupted":
                    raise KeyboardInterrupt
            runs.append(run)
        rows = []
        for run in runs:
            r = evaluate_checkpoints([run], split="val", ten=True, batch_size=cfg.eval_batch_size)
            rows.append({p["patches"]: p for p in r})
        res = {"name": n, **_static(cfg, runs[0])}
        res.update({
            "group": metas[n].get("group", ""),
            "step_time_rel_paper": timed.get(n),
            "seeds_done": len(runs),
            "top1_err": _mean([r[1]["top1_err"] for r in rows]), "top5_err": _mean([r[1]["top5_err"] for r in rows]),
            "top1_err_std": _std([r[1]["top1_err"] for r in rows]), "top5_err_std": _std([r[1]["top5_err"] for r in rows]),
            "ten_top1_err": _mean([r[10]["top1_err"] for r in rows]),
            "ten_top5_err": _mean([r[10]["top5_err"] for r in rows]),
            "per_seed": [{"top1_err": r[1]["top1_err"], "top5_err": r[1]["top5_err"],
                          "ten_top1_err": r[10]["top1_err"], "ten_top5_err": r[10]["top5_err"]} for r in rows],
            "steps": [read_metrics(run)[-1].get("step") for run in runs],
            "paper_delta_top1": metas[n].get("paper_delta_top1"), "paper_delta_top5": metas[n].get("paper_delta_top5"),
            "runs": [str(r) for r in runs],
        })
        done[n] = res
        _write(out, done, data)
    _write(out, done, data)
    _plots(out, done)
    return [done[n] for n in names if n in done]


def run_figure1(out, data=None, sets=(), **kw) -> dict:
    """Figure 1 on the ablations' data (rendered at 32x32); kept if OUT/figure1.json exists."""
    from .fig1 import figure1
    from .train import resolve_data
    out = Path(out)
    if (out / "figure1.json").exists():
        return json.loads((out / "figure1.json").read_text())
    cfg, _ = load_experiment("paper", data, sets)
    cache, _ = resolve_data(cfg.data)
    res = figure1(cache, out, **kw)
    _append_figure1(out, res)
    return res


def _append_figure1(out: Path, res: dict) -> None:
    r, t = res["acts"]["relu"], res["acts"]["tanh"]
    ratio = res["ratio_tanh_over_relu"]
    text = (f"\n## Figure 1: ReLU vs tanh, four-layer CNN, {res['side']}x{res['side']} images\n\n"
            f"Epochs to reach {100 * res['target_train_err']:.0f}% training error ({res['images']} images, "
            f"no regularisation, each with its best learning rate from a grid): ReLU {r['epochs']} "
            f"(lr {r['lr']}), tanh {t['epochs']} (lr {t['lr']}); ratio "
            f"{'%.1f' % ratio if ratio else 'n/a (one did not reach the target in ' + str(res['max_epochs']) + ' epochs)'}"
            f". The paper: six times faster with ReLUs on CIFAR-10.\n\n![Figure 1](figure1.png)\n")
    md = out / "ablations.md"
    md.write_text((md.read_text() if md.exists() else "") + text)


def _static(cfg, run) -> dict:
    """Costs from the layout table, for the number of classes the run was trained on."""
    from .config import replace
    from .model import model_layout
    classes = json.loads((Path(run) / "run.json").read_text())["classes"]
    mcfg = replace(cfg.model, num_classes=len(classes))
    lay = model_layout(mcfg.layout, mcfg)
    return {"layout": lay.name, "columns": lay.columns, "classes": len(classes), "params": lay.params(),
            "macs_per_image": lay.macs_per_image(),
            "exchange_bytes_per_image": sum(lay.exchange_bytes_per_image().values())}


def _as_dict(cfg) -> dict:
    from .config import to_dict
    return to_dict(cfg)


def _mean(v):
    return sum(v) / len(v) if v else None


def _std(v):
    return statistics.stdev(v) if len(v) > 1 else 0.0


def _write(out: Path, done: dict, data) -> None:
    order = [n for n in experiment_names() if n in done] + [n for n in done if n not in experiment_names()]
    rows = [done[n] for n in order]
    tmp = out / ".ablations.json.tmp"
    tmp.write_text(json.dumps(rows, indent=2))
    tmp.replace(out / "ablations.json")
    base = done.get("paper")
    lines = [
        "# Ablations",
        "",
        f"Data: {'`' + str(data) + '` (full paper schedule)' if data else 'the built-in synthetic set (10 classes; chance 90% top-1), experiments/ablations/_base.toml: batch 32, 2 minutes of training each'}. "
        "Errors on the validation set; +/- is the spread over seeds. Step time: one training step of the "
        "experiment's model relative to `paper`, same input, measured in one process. Delta: the "
        "experiment's top-1/top-5 error minus `paper`'s, in % points (+ = worse), beside the paper's.",
        "",
        "| experiment | group | columns | params | MACs/image | exchange B/image | step time vs paper | "
        "top-1 err (centre) | top-5 err (centre) | top-1 err (10 patches) | top-5 err (10 patches) | "
        "delta top-1 / top-5 | paper's delta |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        d = "-"
        if base and r["name"] != "paper":
            d = f"{100 * (r['top1_err'] - base['top1_err']):+.1f} / {100 * (r['top5_err'] - base['top5_err']):+.1f}"
        pd = "-"
        if r.get("paper_delta_top1") is not None:
            pd = f"{r['paper_delta_top1']:+.1f}" + (f" / {r['paper_delta_top5']:+.1f}"
                                                   if r.get("paper_delta_top5") is not None else "")
        st = f"{r['step_time_rel_paper']:.2f}" if r.get("step_time_rel_paper") else "-"
        pm = (lambda m, s: f"{100 * m:.1f}" + (f" +/- {100 * s:.1f}" if s else ""))
        lines.append(
            f"| {r['name']} | {r['group']} | {r['columns']} | {r['params']:,} | {r['macs_per_image'] / 1e9:.3f} G | "
            f"{r['exchange_bytes_per_image']:,} | {st} | {pm(r['top1_err'], r['top1_err_std'])} | "
            f"{pm(r['top5_err'], r['top5_err_std'])} | {100 * r['ten_top1_err']:.1f} | {100 * r['ten_top5_err']:.1f} | "
            f"{d} | {pd} |")
    chance = [r["name"] for r in rows if r["top1_err"] >= 1 - 1 / r.get("classes", 10) - 0.05]
    if chance:
        lines += ["", f"Near chance (centre top-1 error within 5 points of 1 - 1/classes): {', '.join(chance)}. "
                  "These runs had not left the initial plateau of the paper's init (N(0, 0.01^2), biases 1) "
                  "within the budget, so their errors say nothing about the ablated component; the cost "
                  "columns (parameters, MACs, exchange bytes, step time) hold regardless. A longer budget "
                  "(--set max_minutes=...) or real data with the full schedule (--data) is needed for "
                  "the accuracy columns."]
    lines += ["", f"Seeds per experiment: {', '.join(str(r['seeds_done']) for r in rows)}; "
              f"training steps: {', '.join(str(r['steps']) for r in rows)}."]
    if (out / "curves_layer_splits.png").exists() or rows:
        lines += ["", "Validation error curves per group: " + ", ".join(
            f"![{g}](curves_{g.replace(' ', '_')}.png)" for g in sorted({r['group'] for r in rows}))]
    (out / "ablations.md").write_text("\n".join(lines) + "\n")
    if (out / "figure1.json").exists():
        _append_figure1(out, json.loads((out / "figure1.json").read_text()))


def _plots(out: Path, done: dict) -> None:
    import matplotlib
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


# ---- command line -------------------------------------------------------------------------------
def register(sub) -> None:
    p = sub.add_parser("ablate", help="train and evaluate the ablations; one results table")
    p.add_argument("--out", required=True)
    p.add_argument("--data", help="a folder of class folders (the full paper schedule); default: built-in set")
    p.add_argument("--only", nargs="+", metavar="NAME", help="these experiments only (default: all)")
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override for every experiment, e.g. max_steps=20")
    p.add_argument("--list", action="store_true", help="list the experiments and exit")
    p.add_argument("--no-figure1", action="store_true", help="skip the Figure 1 measurement (ReLU vs tanh)")
    p.set_defaults(func=_main)


def _main(args) -> int:
    if args.list:
        for n in experiment_names():
            cfg, meta = load_experiment(n)
            print(f"{n:<18} {meta.get('group', '')}")
        return 0
    rows = run_ablations(args.out, args.only, args.data, args.seeds, args.sets)
    if not args.no_figure1:
        run_figure1(args.out, args.data, args.sets)
    print((Path(args.out) / "ablations.md").read_text())
    return 0 if rows else 1


__all__ = ["run_ablations", "load_experiment", "experiment_names", "apply_sets"]
