"""The commands for trained networks: `import caffe|torchvision`, `predict`, `export`, `figures`."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from ..data.config import DataError

RUN_HELP = "a run folder (trained, reproduced or imported) or its checkpoint.pt"


def register(sub) -> None:
    imp = sub.add_parser("import", help="a trained network (Caffe's bvlc_alexnet, torchvision's) as a run folder")
    kinds = imp.add_subparsers(dest="kind", metavar="KIND", required=True)
    c = kinds.add_parser("caffe", help="bvlc_alexnet.caffemodel: the two-group network, Caffe's conventions")
    c.add_argument("model", metavar="MODEL.caffemodel")
    c.add_argument("--out", required=True, metavar="RUN")
    c.add_argument("--mean", metavar="MEAN.binaryproto", help="Caffe's mean image (default: its channel means)")
    c.add_argument("--classes", metavar="FILE", help="class ids and names, synset_words.txt format "
                                                     "(default: the shipped ILSVRC-2012 list)")
    c.set_defaults(func=_import_caffe)
    t = kinds.add_parser("torchvision", help="alexnet-owt-7be5be79.pth: the one-tower network (layout owt)")
    t.add_argument("model", metavar="FILE.pth")
    t.add_argument("--out", required=True, metavar="RUN")
    t.add_argument("--classes", metavar="FILE")
    t.set_defaults(func=_import_torchvision)

    p = sub.add_parser("predict", help="top-k classes of images, by a run's network and preprocessing")
    p.add_argument("images", nargs="+", metavar="IMAGE|FOLDER")
    p.add_argument("--checkpoint", required=True, metavar="RUN", help=RUN_HELP)
    p.add_argument("--ten-crop", action="store_true", help="mean of the ten patches' probabilities (§4.1)")
    p.add_argument("--top", type=int, default=5, metavar="K")
    p.add_argument("--json", action="store_true", help="only JSON on stdout: one object per image")
    p.add_argument("--devices", nargs="+", default=None)
    p.add_argument("--data", help="a trained run's prepared cache, for its mean image if the run's cache moved")
    p.set_defaults(func=_predict)

    e = sub.add_parser("export", help="the network as one single-device graph (torch.export .pt2 or ONNX)")
    e.add_argument("--checkpoint", required=True, metavar="RUN", help=RUN_HELP)
    e.add_argument("--out", required=True, metavar="FILE")
    e.add_argument("--format", choices=("pt2", "onnx"), default="pt2")
    e.set_defaults(func=_export)

    f = sub.add_parser("figures", help="Figure 3 (conv1 kernels) and, with data, Figure 4 of any run")
    f.add_argument("--checkpoint", required=True, metavar="RUN", help=RUN_HELP)
    f.add_argument("--data", metavar="CACHE", help="a prepared cache (train and val) for Figure 4")
    f.add_argument("--out", required=True, metavar="DIR")
    f.add_argument("--devices", nargs="+", default=None)
    f.set_defaults(func=_figures)


def _report(src, out) -> int:
    """What was imported: the layout, its parameters and what crosses between its columns (read from
    the run's config.toml, not by loading the weights again)."""
    from ..model.columns import model_layout
    from ..train.config import load_config
    cfg = load_config(Path(out) / "config.toml")
    layout = model_layout(cfg.model.layout, cfg.model)
    xb = ", ".join(f"{k} {v:,}" for k, v in layout.exchange_bytes_per_image().items()) or "none (one column)"
    print(f"imported {src} into {out}: layout {layout.name}, {layout.params():,} parameters, crop {cfg.data.crop_size}, "
          f"resize {cfg.data.resize}; exchange bytes per image (fp32): {xb}")
    return 0


def _import_caffe(args) -> int:
    from .runs import import_caffe
    return _report(args.model, import_caffe(args.model, args.out, args.mean, args.classes))


def _import_torchvision(args) -> int:
    from .runs import import_torchvision
    return _report(args.model, import_torchvision(args.model, args.out, args.classes))


def _devices(args):
    return tuple(args.devices) if getattr(args, "devices", None) else None


def _predict(args) -> int:
    from .load import load
    from .predict import format_results, predict
    if args.top < 1:
        raise DataError(f"--top: must be >= 1, got {args.top}")
    model, prep = load(args.checkpoint, _devices(args), args.data)
    results, skipped = predict(model, prep, args.images, args.top, args.ten_crop)
    for path, why in skipped:
        print(f"splitnet predict: skipped {path}: {why}", file=sys.stderr)
    print(json.dumps(results) if args.json else format_results(results))
    return 0 if not skipped else (1 if results else 2)


def _export(args) -> int:
    from .export import export
    from .load import load
    model, prep = load(args.checkpoint, "cpu", need_mean=False)
    out = export(model, prep.crop, args.out, args.format)
    print(f"exported {args.checkpoint} to {out} ({args.format}; input float32 [B, 3, {prep.crop}, {prep.crop}], "
          f"RGB minus the run's mean; output logits [B, {len(prep.classes)}])")
    return 0


def _figures(args) -> int:
    from ..experiments.figures import figure3, figure4
    from .load import load
    out = Path(args.out)
    # Figure 4 subtracts the mean itself (the cache's, or the run's data.mean_file): no mean needed here.
    model, prep = load(args.checkpoint, _devices(args), need_mean=False)
    scores = {"figure3": figure3(model, out / "figure3_conv1_kernels.png")}
    if args.data:
        from ..config import replace
        from ..data import resolve_data
        cache, _ = resolve_data(replace(prep.data, root=str(args.data)))
        scores["figure4"] = figure4(model, cache, out / "figure4_predictions_neighbours.png", prep.data,
                                    model_classes=prep.classes, names=prep.names)
    (out / "figures.json").write_text(json.dumps(scores, indent=2))
    print(json.dumps(scores, indent=2))
    return 0
