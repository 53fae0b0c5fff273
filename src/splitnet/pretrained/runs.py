"""`splitnet import caffe|torchvision`: a trained network written as a run folder every command reads.

The folder (train/rundir.py's files, as far as they apply):
  checkpoint.pt  the weights in the grouped form, the TrainConfig that rebuilds the network exactly,
                 the class ids, and {"imported": {...}} with the readable names and the source file
  config.toml    that TrainConfig, readable
  run.json       where it came from, its classes, layout, and its preprocessing
  mean.npy       the mean image [3, 256, 256] (RGB, 0..255) the network was trained with
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..config import replace, to_dict
from ..data.config import DataConfig
from ..model.config import ModelConfig
from ..model.convert import grouped_shapes
from ..model.columns import model_layout
from ..train import checkpoint as ckpt
from ..train.config import TrainConfig, dump_toml
from ..train.errors import RunError
from ..train.rundir import RunDir, atomic_write_text
from . import caffe, names, torchvision

MEAN_FILE = "mean.npy"

# Caffe's forward (bvlc_alexnet's deploy.prototxt): 227 crops, LRN over all maps with alpha/n and
# k = 1, dropout identity at test; its tools squashed every image to 256x256 (convert_imageset, OpenCV
# bilinear) and subtracted the per-pixel mean at the crop's offset.
CAFFE = TrainConfig(
    name="bvlc_alexnet", note="imported from Caffe (bvlc_alexnet); Caffe's conventions, not the paper's",
    model=ModelConfig(layout="paper", input_mode="caffe227", lrn_scope="all", lrn_convention="code", lrn_k=1.0,
                      dropout_mode="inverted"),
    data=DataConfig(resize="squash", resample="bilinear", crop_size=227, mean_crop="aligned", mean_file=MEAN_FILE))
# torchvision's (alexnet-owt): shorter side to 256 (bilinear), centre 224, mean/std folded (torchvision.py).
TORCHVISION = TrainConfig(
    name="alexnet-owt", note="imported from torchvision (alexnet-owt-7be5be79); the One-weird-trick one-tower net",
    model=ModelConfig(layout="owt", input_mode="torchvision", lrn=False, dropout_mode="inverted"),
    data=DataConfig(resize="shorter", resample="bilinear", crop_size=224, mean_file=MEAN_FILE))


def _shapes(cfg: TrainConfig) -> dict:
    return {k: tuple(v) for k, v in grouped_shapes(model_layout(cfg.model.layout, cfg.model)).items()}


def import_caffe(model_file, out, mean_file=None, classes_file=None) -> Path:
    """Write the run folder `out` for Caffe's `model_file` (and its binaryproto mean, if given)."""
    layers = caffe.read_layers(model_file)
    cfg = replace(CAFFE, model=replace(CAFFE.model, num_classes=caffe.num_outputs(layers)))
    state = caffe.grouped_state(layers, _shapes(cfg), model_file)
    mean = caffe.read_mean(mean_file) if mean_file else caffe.channel_mean(cfg.data.image_size)
    if mean.shape[1] != cfg.data.image_size:
        cfg = replace(cfg, data=replace(cfg.data, image_size=int(mean.shape[1])))
    source = {"kind": "caffe", "file": str(Path(model_file).resolve()),
              "mean": str(Path(mean_file).resolve()) if mean_file else f"Caffe's channel means BGR {caffe.BGR_MEANS}"}
    return write_run(out, cfg, state, mean, classes_file, source)


def import_torchvision(pth_file, out, classes_file=None) -> Path:
    """Write the run folder `out` for torchvision's AlexNet state dict `pth_file`."""
    sd = torchvision.read_state(pth_file)
    cfg = replace(TORCHVISION, model=replace(TORCHVISION.model, num_classes=torchvision.num_outputs(sd, pth_file)))
    state = torchvision.grouped_state(sd, _shapes(cfg), pth_file)
    source = {"kind": "torchvision", "file": str(Path(pth_file).resolve()),
              "mean": f"torchvision's mean {torchvision.MEAN} (x255), std {torchvision.STD} folded into conv1"}
    return write_run(out, cfg, state, torchvision.mean_image(cfg.data.image_size), classes_file, source)


def preprocessing_record(cfg: TrainConfig) -> dict:
    d = cfg.data
    return {"resize": d.resize, "image_size": d.image_size, "resample": d.resample, "crop": d.crop_size,
            "mean": d.mean_file or "the training cache's mean image", "channels": "RGB, 0..255, mean subtracted",
            "input_mode": cfg.model.input_mode}


def write_run(out, cfg: TrainConfig, state: dict, mean: np.ndarray, classes_file, source: dict) -> Path:
    """The run folder (module docstring); refuses a folder that already holds a run."""
    run = RunDir(out)
    if run.path.is_file():
        raise RunError(f"--out {run.path}: a file, not a folder")
    if run.is_run() or (run.path / MEAN_FILE).exists():
        raise RunError(f"--out {run.path} already holds a run; choose another folder")
    n = cfg.model.num_classes
    ids, readable = names.classes_for(n, classes_file)
    run.path.mkdir(parents=True, exist_ok=True)
    np.save(run.path / MEAN_FILE, mean.astype(np.float32))
    imported = {**source, "class_names": readable}
    ckpt.atomic_save({"format": ckpt.FORMAT, "model": state, "config": to_dict(cfg), "classes": ids,
                      "imported": imported}, run.checkpoint)
    atomic_write_text(run.config, dump_toml(cfg))
    info = {"imported": source, "classes": ids, "layout": cfg.model.layout, "preprocessing": preprocessing_record(cfg)}
    atomic_write_text(run.info, json.dumps(info, indent=2))
    return run.path
