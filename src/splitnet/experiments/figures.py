"""The paper's figures from a trained model: Figure 3 (conv1 kernels), Figure 4 (predictions and
nearest neighbours in the last hidden layer), and training curves.

Figure 3 (§6.1): "the kernels on GPU 1 are largely color-agnostic, while the kernels on GPU 2 are
largely color-specific". `colour_specificity` turns that into a number per column, so the claim can
be checked: the share of a kernel's energy that is not grey. A kernel w [3, 11, 11] is split into
its grey part g (the mean over R, G, B at each pixel, repeated on the three channels) and its colour
part w - g; the score is |w - g|^2 / |w|^2: 0 for a kernel that treats R, G and B alike, 2/3 on
average for random (untrained) weights, up to 1.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..data import DataConfig, PackedDataset
from ..data.pipeline import eval_batch


def colour_specificity(kernels: torch.Tensor) -> torch.Tensor:
    """Per kernel [K]: |w - grey(w)|^2 / |w|^2 for kernels [K, 3, h, w]."""
    w = kernels.detach().double()
    grey = w.mean(1, keepdim=True)
    return ((w - grey) ** 2).flatten(1).sum(1) / (w ** 2).flatten(1).sum(1).clamp_min(1e-30)


def conv1_columns(model) -> list:
    """conv1 kernels of each column: list of [48, 3, 11, 11] (paper layout)."""
    return [col.conv1.weight.detach().cpu() for col in model.columns]


def figure3(model, path, scale: int = 5, per_row: int = 16) -> dict:
    """The conv1 kernels as a PNG, column 0's above column 1's, each kernel min-max scaled to the full
    range (as the paper's figure); returns {'column_<c>_colour_specificity': mean score, ...}."""
    cols = conv1_columns(model)
    k = cols[0].shape[-1]
    cell = k * scale + 2
    rows_per_col = [int(np.ceil(c.shape[0] / per_row)) for c in cols]
    gap = 12
    height = sum(r * cell for r in rows_per_col) + gap * (len(cols) - 1) + 2
    img = Image.new("RGB", (per_row * cell + 2, height), (255, 255, 255))
    y0 = 2
    scores = {}
    for c, (w, nrows) in enumerate(zip(cols, rows_per_col)):
        s = colour_specificity(w)
        scores[f"column_{c}_colour_specificity"] = float(s.mean())
        for i in range(w.shape[0]):
            ker = w[i].numpy()
            lo, hi = ker.min(), ker.max()
            ker = (ker - lo) / (hi - lo + 1e-12)
            tile = Image.fromarray((ker.transpose(1, 2, 0) * 255).astype(np.uint8))
            tile = tile.resize((k * scale, k * scale), Image.NEAREST)
            img.paste(tile, (2 + (i % per_row) * cell, y0 + (i // per_row) * cell))
        y0 += nrows * cell + gap
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return scores


def _display(img_chw: torch.Tensor) -> np.ndarray:
    """A uint8 [3, S, S] cache image as HWC for plotting."""
    return img_chw.permute(1, 2, 0).numpy()


@torch.no_grad()
def figure4(model, cache, path, data_cfg=None, n_predict: int = 8, n_query: int = 5, n_neighbours: int = 6,
            max_train: int = 20000, batch_size: int = 64, seed: int = 0, model_classes=None, names=None) -> dict:
    """Left: `n_predict` validation images with the model's top-5 labels and probabilities (centre
    patch). Right: `n_query` validation images and the `n_neighbours` training images whose last hidden
    layer (fc7, 4096-d) vectors are nearest in Euclidean distance (§6.1). At most `max_train` training
    images are searched (a random subset beyond that; the figure says so)."""
    import matplotlib  # here, not at the top: only plotting needs it (a slow import), Agg before pyplot
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train_ds, val_ds = PackedDataset(cache, "train"), PackedDataset(cache, "val")
    if data_cfg is not None and data_cfg.mean_file:  # an imported network's own mean (splitnet import)
        train_ds, val_ds = train_ds.with_mean(data_cfg.mean_file), val_ds.with_mean(data_cfg.mean_file)
    classes = train_ds.classes
    # The model's classes (ids) and their readable names: an imported network's own, else the cache's.
    ids = list(model_classes or classes)
    names = list(names or ids)
    g = torch.Generator().manual_seed(seed)
    pick = torch.randperm(len(val_ds), generator=g)[: n_predict + n_query].tolist()
    dev = model.devices[0]
    model.eval()
    v_imgs, v_labels, v_x = _centre(val_ds, pick, data_cfg)
    probs = torch.softmax(model(v_x.to(dev)).float(), 1).cpu()
    q_feat = model.features(v_x[n_predict:].to(dev), "fc7").float().cpu()

    pool = torch.arange(len(train_ds))
    if len(train_ds) > max_train:
        pool = torch.randperm(len(train_ds), generator=g)[:max_train].sort().values
    dist = torch.cdist(q_feat, _fc7_features(model, train_ds, pool, batch_size, data_cfg))
    nearest = pool[dist.topk(n_neighbours, largest=False).indices]

    fig = plt.figure(figsize=(2.2 * (n_neighbours + 1) + 2.2 * 4, 2.4 * max(2, n_query)))
    gs = fig.add_gridspec(max(2, n_query), n_neighbours + 1 + 4, wspace=0.3, hspace=0.45)
    _plot_predictions(fig, gs, v_imgs[:n_predict], v_labels[:n_predict], probs, classes, ids, names)
    _plot_neighbours(fig, gs, v_imgs[n_predict:], v_labels[n_predict:], train_ds, nearest, classes)
    fig.suptitle(f"Figure 4: top-5 predictions (red: the true label); nearest training images by fc7 "
                 f"distance (searched {len(pool)} of {len(train_ds)} training images)", fontsize=9)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90, bbox_inches="tight")
    plt.close(fig)
    same = (torch.tensor(train_ds.labels)[nearest] == v_labels[n_predict:, None]).float().mean().item()
    shown = zip(probs[:n_predict].argmax(1), v_labels[:n_predict])
    top1 = float(np.mean([ids[int(t)] == classes[int(v)] for t, v in shown]))
    return {"neighbours_same_class": same, "searched_train_images": int(len(pool)),
            "shown_predictions_top1_correct": top1}


def _centre(ds, idx, data_cfg) -> tuple:
    """(uint8 images, labels, centre patches ready for the model) of ds's images `idx`."""
    imgs, labels = ds.get_batch(idx)
    return imgs, labels, eval_batch(imgs, ds.mean, data_cfg or _dcfg(), ten=False)


def _fc7_features(model, ds, pool, batch_size: int, data_cfg) -> torch.Tensor:
    """fc7 vectors [len(pool), 4096] of ds's images `pool` (centre patches), in batches."""
    feats = []
    for i in range(0, len(pool), batch_size):
        _, _, x = _centre(ds, pool[i:i + batch_size].tolist(), data_cfg)
        feats.append(model.features(x.to(model.devices[0]), "fc7").float().cpu())
    return torch.cat(feats)


def _plot_predictions(fig, gs, imgs, labels, probs, classes, ids, names) -> None:
    """Figure 4's left: each image beside its top-5 bars, two images a grid row, as many as fit."""
    rows = gs.get_geometry()[0]
    for i in range(len(imgs)):
        r, c = divmod(i, 2)
        if r >= rows:
            break
        inner = gs[r % rows, c * 2:(c * 2) + 2].subgridspec(1, 2, wspace=0.05)
        ax = fig.add_subplot(inner[0])
        ax.imshow(_display(imgs[i]))
        ax.set_axis_off()
        ax.set_title(classes[int(labels[i])], fontsize=7)
        ax2 = fig.add_subplot(inner[1])
        p, top = probs[i].topk(min(5, len(ids)))
        colors = ["tab:red" if ids[int(t)] == classes[int(labels[i])] else "tab:blue" for t in top]
        ax2.barh(range(len(top))[::-1], p.numpy(), color=colors)
        ax2.set_yticks(range(len(top))[::-1], [names[int(t)][:24] for t in top], fontsize=6)
        ax2.yaxis.tick_right()
        ax2.set_xlim(0, 1)
        ax2.tick_params(axis="x", labelsize=5)


def _plot_neighbours(fig, gs, queries, labels, train_ds, nearest, classes) -> None:
    """Figure 4's right: a query image a row (grid column 4), its nearest training images after it."""
    for q in range(len(queries)):
        ax = fig.add_subplot(gs[q, 4])
        ax.imshow(_display(queries[q]))
        ax.set_axis_off()
        ax.set_title("query: " + classes[int(labels[q])], fontsize=7)
        nb_imgs, nb_labels = train_ds.get_batch(nearest[q].tolist())
        for j in range(nearest.shape[1]):
            ax = fig.add_subplot(gs[q, 5 + j])
            ax.imshow(_display(nb_imgs[j]))
            ax.set_axis_off()
            ax.set_title(classes[int(nb_labels[j])], fontsize=6)


def _dcfg():
    return DataConfig()


def training_curves(metrics: list, path) -> None:
    """Loss (per step, and its running mean), validation error per epoch, learning rate."""
    import matplotlib  # here, not at the top: only plotting needs it (a slow import), Agg before pyplot
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tr = [m for m in metrics if m.get("kind") == "train"]
    ev = [m for m in metrics if m.get("kind") == "eval"]
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.6))
    if tr:
        steps = np.array([m["step"] for m in tr])
        loss = np.array([m["loss"] for m in tr])
        axes[0].plot(steps, loss, lw=0.5, alpha=0.4, label="loss")
        w = max(1, len(loss) // 30)
        if len(loss) >= w:
            axes[0].plot(steps[w - 1:], np.convolve(loss, np.ones(w) / w, mode="valid"), label=f"mean of {w}")
        axes[0].set_xlabel("step")
        axes[0].set_title("training loss")
        axes[0].legend(fontsize=7)
        axes[2].plot(steps, [m["lr"] for m in tr])
        axes[2].set_yscale("log")
        axes[2].set_xlabel("step")
        axes[2].set_title("learning rate")
    if ev:
        axes[1].plot([m["step"] for m in ev], [m["val_top1_err"] for m in ev], "o-", label="top-1")
        axes[1].plot([m["step"] for m in ev], [m["val_top5_err"] for m in ev], "o-", label="top-5")
        axes[1].set_ylim(0, 1)
        axes[1].set_xlabel("step")
        axes[1].set_title("validation error (centre patch)")
        axes[1].legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
