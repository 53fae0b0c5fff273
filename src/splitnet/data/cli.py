"""`splitnet data synth | prepare | info`: the data subcommands."""
from __future__ import annotations

import json
from pathlib import Path

from .. import config as _config
from . import cache as C
from .archive import is_cifar_archive
from .config import PIL_MAX_IMAGE_PIXELS, DataConfig
from .preparation import prepare
from .synth import DEFAULTS, make_synthetic


def register(sub) -> None:
    p = sub.add_parser("data", help="make the synthetic set; prepare a folder of class folders into a cache")
    actions = p.add_subparsers(dest="data_action", metavar="ACTION")
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])

    s = actions.add_parser("synth", help="write the built-in SYNTHETIC ImageNet-style set (deterministic from --seed)")
    s.add_argument("--out", required=True, help="new or empty folder; gets train/<class>/*.JPEG, val/<class>/*.JPEG")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--classes", type=int, default=DEFAULTS["classes"])
    s.add_argument("--train-per-class", type=int, default=DEFAULTS["train_per_class"])
    s.add_argument("--val-per-class", type=int, default=DEFAULTS["val_per_class"])
    s.add_argument("--workers", type=int, default=0, help="processes (0 = every core); output is the same for any")
    s.set_defaults(func=_synth)

    q = actions.add_parser("prepare", help="decode ROOT/{train,val}/<class>/* once into a packed 256x256 cache (§2)")
    q.add_argument("--src", required=True,
                   help="ROOT holding train/<class>/* (and optionally val/<class>/*), or the CIFAR-10 python "
                        "archive cifar-10-python.tar.gz as distributed (read directly, packed at its native "
                        "32x32 unless --image-size says otherwise)")
    q.add_argument("--out", required=True, help="cache folder; rerunning resumes an interrupted preparation")
    q.add_argument("--workers", type=int, default=0, help="processes (0 = every core)")
    q.add_argument("--strict", action="store_true", help="stop at the first unreadable file")
    q.add_argument("--max-bad-fraction", type=float, default=0.01,
                   help="stop when more than this share of a split is unreadable (default 0.01)")
    q.add_argument("--shard-size", type=int, default=1024, help="images per shard (default 1024)")
    q.add_argument("--image-size", type=int, default=None,
                   help="side of the packed images (default: 256 for folders, §2; 32 for the CIFAR-10 archive, "
                        "its native size)")
    q.add_argument("--resample", default="lanczos", help="lanczos (default), bicubic, bilinear, box, hamming")
    q.add_argument("--max-image-pixels", type=int, default=PIL_MAX_IMAGE_PIXELS,
                   help=f"refuse larger images (decompression bombs; default Pillow's {PIL_MAX_IMAGE_PIXELS:,}; 0 = no limit)")
    q.add_argument("--no-progress", action="store_true", help="no progress bar or progress lines")
    q.set_defaults(func=_prepare)

    i = actions.add_parser("info", help="summarise a prepared cache")
    i.add_argument("cache")
    i.add_argument("--json", action="store_true")
    i.set_defaults(func=_info)


def _synth(args) -> int:
    root = make_synthetic(args.out, seed=args.seed, classes=args.classes, train_per_class=args.train_per_class,
                          val_per_class=args.val_per_class, workers=args.workers)
    print(f"synthetic set in {root} (see {Path(root) / 'SYNTHETIC.txt'})")
    return 0


def _prepare(args) -> int:
    cfg = _config.from_dict(DataConfig, {
        "prepare_workers": args.workers, "strict": args.strict, "max_bad_fraction": args.max_bad_fraction,
        "shard_size": args.shard_size, "image_size": args.image_size or _default_size(args.src), "resample": args.resample,
        "max_image_pixels": args.max_image_pixels})
    report = prepare(args.src, args.out, cfg=cfg, progress=not args.no_progress)
    for split, r in report["splits"].items():
        print(f"{split}: {r['packed']} of {r['files']} images packed, {len(r['skipped'])} skipped, "
              f"{len(r['notes'])} packed with a note (converted, upscaled), {len(r['ignored'])} other files ignored"
              + _left_out(r))
    print(f"cache ready: {args.out} (details: {Path(args.out) / 'report.json'})")
    return 0


def _left_out(r: dict) -> str:
    """', 2 hidden, 1 link not followed' for what a folder listing left out (none for an archive)."""
    parts = []
    if r.get("hidden", {}).get("count"):
        parts.append(f"{r['hidden']['count']} hidden")
    if r.get("links_skipped"):
        parts.append(f"{len(r['links_skipped'])} link(s) not followed")
    return "".join(", " + p for p in parts)


def _default_size(src) -> int:
    """§2's 256 for a folder of photographs; the native 32 for CIFAR-10's archive (upscaling 32-pixel
    images to 256 would only make the cache 64 times larger)."""
    return 32 if Path(src).is_file() and is_cifar_archive(src) else 256


def _info(args) -> int:
    info = C.read_info(args.cache)
    stats = json.loads((Path(args.cache) / C.STATS_JSON).read_text())
    if args.json:
        print(json.dumps({"cache": info, "stats": stats}, indent=1))
        return 0
    classes = C.read_classes(args.cache)
    print(f"{args.cache}: {info['image_size']}x{info['image_size']} uint8, {len(classes)} classes "
          f"({', '.join(classes[:5])}{', ...' if len(classes) > 5 else ''}), from {info['src']}")
    for split, s in info["splits"].items():
        print(f"  {split}: {s['count']} images in {len(s['shards'])} shards")
    print("  RGB mean (0..255): " + ", ".join(f"{v:.2f}" for v in stats["rgb_mean"]))
    print("  RGB covariance eigenvalues (0..255 units): " + ", ".join(f"{v:.2f}" for v in stats["eigvals"]))
    return 0
