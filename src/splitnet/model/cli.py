"""`splitnet layouts`: the built-in layouts, or one layout's table with its costs."""
from __future__ import annotations

import json

from .layout import GEOMETRIES, get_layout, layouts


def register(sub) -> None:
    p = sub.add_parser("layouts", help="list the built-in layouts, or show one as a table")
    p.add_argument("name", nargs="?", help="show this layout's table (params, MACs, exchange bytes)")
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--geometry", default="imagenet", choices=tuple(GEOMETRIES),
                   help="the scale: imagenet (the paper's) or cifar (32x32 images; experiments/cifar.toml)")
    p.add_argument("--json", action="store_true", help="print machine-readable costs")
    p.set_defaults(func=_layouts)


def _layouts(args) -> int:
    names = [args.name] if args.name else layouts()
    if args.json:
        out = {}
        for n in names:
            lay = get_layout(n, args.num_classes, args.geometry)
            out[n] = {"columns": lay.columns, "params": lay.params(), "macs_per_image": lay.macs_per_image(),
                      "exchange_bytes_per_image": lay.exchange_bytes_per_image()}
        print(json.dumps(out, indent=2))
        return 0
    if args.name:
        lay = get_layout(args.name, args.num_classes, args.geometry)
        print(f"layout {lay.name!r} at geometry {lay.geometry!r}: {lay.columns} column(s), head column {lay.head}\n")
        print(lay.table())
        return 0
    print(f"{'layout':<14}{'columns':>8}{'params':>14}{'GMACs/img':>11}{'exchange B/img':>16}")
    for n in names:
        lay = get_layout(n, args.num_classes, args.geometry)
        print(f"{n:<14}{lay.columns:>8}{lay.params():>14,}{lay.macs_per_image() / 1e9:>11.3f}"
              f"{sum(lay.exchange_bytes_per_image().values()):>16,}")
    return 0
