"""`splitnet predict`: the top-k classes of image files, by any run's network and preprocessing.

Each image is decoded and preprocessed as the run's data were (load.Preprocessing: §2's resize or
Caffe's squash, the centre patch or the ten patches of §4.1, minus the run's mean); with ten patches
the prediction is the mean of the ten softmax outputs (§4.1). A file that cannot be read is named
and skipped; the others are still predicted.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..data.decode import BadImage
from ..data.folders import IMAGE_EXTENSIONS
from ..train.evaluate import predict_probs


def image_files(paths) -> tuple:
    """([file, ...], [(path, reason), ...]): files as given, folders' image files (recursively,
    sorted); paths that do not exist are reasons."""
    files, missing = [], []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS)
        elif p.is_file():
            files.append(p)
        else:
            missing.append((str(p), "no such file or folder"))
    return files, missing


def _read(prep, files) -> tuple:
    good, images, bad = [], [], []
    for f in files:
        try:
            images.append(prep.image(f))
            good.append(f)
        except BadImage as e:
            bad.append((str(f), str(e)))
        except OSError as e:
            bad.append((str(f), e.strerror or str(e)))
    return good, images, bad


def predict(model, prep, paths, top: int = 5, ten: bool = False, batch_size: int = 32):
    """([{"path", "top": [{"index", "name", "prob"}, ...]}, ...], [(path, reason), ...] skipped)."""
    files, skipped = image_files(paths)
    results = []
    k = min(top, len(prep.names))
    for i in range(0, len(files), batch_size):
        good, images, bad = _read(prep, files[i:i + batch_size])
        skipped += bad
        if not good:
            continue
        x = prep.batch(torch.stack(images), ten=ten)
        probs, _ = predict_probs(model, [(x, torch.zeros(len(good), dtype=torch.long))])
        p, idx = probs.topk(k, dim=1)
        for f, pr, ix in zip(good, p.tolist(), idx.tolist()):
            results.append({"path": str(f), "top": [{"index": j, "name": prep.names[j], "prob": q}
                                                    for j, q in zip(ix, pr)]})
    return results, skipped


def format_results(results) -> str:
    lines = []
    for r in results:
        lines.append(r["path"])
        lines += [f"  {i}. {t['prob']:7.2%}  {t['name']}  (class {t['index']})" for i, t in enumerate(r["top"], 1)]
    return "\n".join(lines)
