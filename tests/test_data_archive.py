"""The CIFAR-10 python archive as distributed, prepared straight into the cache (data/archive.py).
The archives here are built in the official format: cifar-10-batches-py/ in a tar.gz, batches pickled
as Python 2's cPickle wrote them (protocol 2, BINSTRING keys and pixels, numpy's _reconstruct),
members in the official order."""
import io
import json
import pickle
import struct
import tarfile

import numpy as np
import pytest
from PIL import Image

from splitnet.cli import main
from splitnet.data import DataConfig, DataError, LoaderSpec, PackedDataset, ensure_cache, is_cache, make_loader, prepare
from splitnet.data import preparation as prep_mod
from splitnet.data.archive import is_cifar_archive, unpickle
from splitnet.data.cache import default_cache_dir

NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
N_BATCH, N_TEST = 24, 20  # images per data batch (5 of them) and in test_batch
# `tar tzf cifar-10-python.tar.gz` lists the members in this order (not sorted).
ORDER = ["data_batch_4", "readme.html", "test_batch", "data_batch_3", "batches.meta", "data_batch_2",
         "data_batch_5", "data_batch_1"]


# ---- Python 2's pickle format -------------------------------------------------------------------------
class _Dtype:
    """Stands for a numpy dtype in _py2 (pickled as Python 2's numpy did)."""

    def __init__(self, dtype):
        self.dtype = np.dtype(dtype)


def _w(obj, out: bytearray) -> None:
    if isinstance(obj, dict):
        out += b"}("
        for k, v in obj.items():
            _w(k, out)
            _w(v, out)
        out += b"u"  # SETITEMS
    elif isinstance(obj, list):
        out += b"]("
        for v in obj:
            _w(v, out)
        out += b"e"  # APPENDS
    elif isinstance(obj, tuple):
        out += b"("
        for v in obj:
            _w(v, out)
        out += b"t"
    elif obj is None:
        out += b"N"
    elif obj is True or obj is False:
        out += b"\x88" if obj else b"\x89"
    elif isinstance(obj, int):
        out += b"K" + bytes([obj]) if 0 <= obj < 256 else b"J" + struct.pack("<i", obj)
    elif isinstance(obj, bytes):  # a Python 2 str
        out += b"U" + bytes([len(obj)]) + obj if len(obj) < 256 else b"T" + struct.pack("<I", len(obj)) + obj
    elif isinstance(obj, _Dtype):
        dt = obj.dtype
        out += b"cnumpy\ndtype\n"
        _w((f"{dt.kind}{dt.itemsize}".encode(), 0, 1), out)
        out += b"R"
        _w((3, b"|" if dt.itemsize == 1 else b"<", None, None, None, -1, -1, 0), out)
        out += b"b"  # BUILD: dtype.__setstate__
    elif isinstance(obj, np.ndarray):
        out += b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n"
        _w((0,), out)
        _w(b"b", out)
        out += b"\x87R"  # TUPLE3, REDUCE: _reconstruct(ndarray, (0,), 'b')
        raw = np.ascontiguousarray(obj, obj.dtype.newbyteorder("<")).tobytes()
        _w((1, tuple(obj.shape), _Dtype(obj.dtype), False, raw), out)
        out += b"b"  # BUILD: ndarray.__setstate__
    else:
        raise TypeError(type(obj))


def _py2(obj) -> bytes:
    """`obj` as Python 2's cPickle.dumps(obj, 2) wrote it; bytes stand for Python 2 str."""
    out = bytearray(b"\x80\x02")
    _w(obj, out)
    return bytes(out + b".")


def test_the_python2_writer_writes_what_pickle_reads():
    a = np.arange(2 * 3072, dtype=np.uint8).reshape(2, 3072)
    obj = pickle.loads(_py2({b"data": a, b"labels": [1, 300, -2]}), encoding="bytes")
    assert np.array_equal(obj[b"data"], a) and obj[b"labels"] == [1, 300, -2]


# ---- building archives --------------------------------------------------------------------------------
def _batch(seed: int, n: int, label: str):
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
    labels = [int(x) for x in (np.arange(n) + seed) % len(NAMES)]
    return {b"batch_label": label.encode(), b"labels": labels, b"data": data,
            b"filenames": [f"img_{seed}_{i}.png".encode() for i in range(n)]}


def official_members(names=NAMES) -> dict:
    """{member basename: object} as in cifar-10-batches-py/ (small batches)."""
    m = {f"data_batch_{k}": _batch(k, N_BATCH, f"training batch {k} of 5") for k in range(1, 6)}
    m["test_batch"] = _batch(9, N_TEST, "testing batch 1 of 1")
    m["batches.meta"] = {b"num_cases_per_batch": N_BATCH, b"label_names": [n.encode() for n in names],
                         b"num_vis": 3072}
    m["readme.html"] = b"<meta HTTP-EQUIV=\"REFRESH\" content=\"0; url=http://www.cs.toronto.edu/~kriz/cifar.html\">"
    return m


def write_archive(path, members: dict, top="cifar-10-batches-py", mode="w:gz"):
    """A tar of `top`/<member>; objects are pickled as Python 2 did, bytes are written as they are."""
    with tarfile.open(path, mode) as tar:
        d = tarfile.TarInfo(top)
        d.type = tarfile.DIRTYPE
        tar.addfile(d)
        for name in sorted(members, key=lambda n: ORDER.index(n) if n in ORDER else len(ORDER)):
            obj = members[name]
            data = obj if isinstance(obj, bytes) else _py2(obj)
            info = tarfile.TarInfo(f"{top}/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def source_images(members: dict, names) -> np.ndarray:
    """The images of members `names`, [n, 3, 32, 32], read straight off the R, G, B planes."""
    data = np.concatenate([members[n][b"data"] for n in names])
    r, g, b = data[:, :1024], data[:, 1024:2048], data[:, 2048:]
    return np.stack([r, g, b], axis=1).reshape(-1, 3, 32, 32)


TRAIN = [f"data_batch_{k}" for k in range(1, 6)]


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    members = official_members()
    path = write_archive(tmp_path_factory.mktemp("src") / "cifar-10-python.tar.gz", members)
    return path, members


@pytest.fixture(scope="module")
def archive_cache(archive, tmp_path_factory):
    path, members = archive
    out = tmp_path_factory.mktemp("cache32")
    # shard size 16 with batches of 24: shards straddle batch boundaries
    report = prepare(path, out, image_size=32, shard_size=16, progress=False)
    return out, report


# ---- the native-size cache ---------------------------------------------------------------------------
def test_native_cache_holds_every_pixel_label_and_source_exactly(archive, archive_cache):
    path, members = archive
    out, _ = archive_cache
    assert is_cache(out)
    info = json.loads((out / "cache.json").read_text())
    assert info["image_size"] == 32 and info["source"] == "cifar-10 python archive"
    assert info["src"] == str(path.resolve())
    assert info["splits"]["train"]["count"] == 5 * N_BATCH and info["splits"]["val"]["count"] == N_TEST
    assert json.loads((out / "classes.json").read_text()) == NAMES
    for split, names in (("train", TRAIN), ("val", ["test_batch"])):
        ds = PackedDataset(out, split)
        images, labels = ds.get_batch(range(len(ds)))
        assert images.dtype.is_floating_point is False and tuple(images.shape[1:]) == (3, 32, 32)
        assert np.array_equal(images.numpy(), source_images(members, names))
        # R, G, B plane order, checked on one image directly
        row = members[names[0]][b"data"][0]
        assert np.array_equal(images[0, 0].numpy().ravel(), row[:1024])
        assert np.array_equal(images[0, 2].numpy().ravel(), row[2048:])
        assert labels.tolist() == [x for n in names for x in members[n][b"labels"]]
        assert ds.files == [f"{n}#{r}" for n in names for r in range(len(members[n][b"labels"]))]
        for i in (0, len(ds) // 2, len(ds) - 1):  # every image traceable to its member and row
            member, row = ds.files[i].split("#")
            src = members[member][b"data"][int(row)]
            assert np.array_equal(ds[i][0].numpy().ravel(), src)
    shard = np.load(out / "train" / "shard-00000.npy", mmap_mode="r")
    assert shard.dtype == np.uint8 and shard.shape == (16, 3, 32, 32)
    assert (out / "train" / "shard-00000.stats.npz").is_file() and (out / "train" / "shard-00000.json").is_file()
    assert not (out / "val" / "shard-00000.stats.npz").exists()


def test_mean_and_statistics_are_those_of_the_training_images(archive, archive_cache):
    _, members = archive
    out, _ = archive_cache
    train = source_images(members, TRAIN).astype(np.float64)
    mean = np.load(out / "mean.npy")
    assert mean.dtype == np.float32 and mean.shape == (3, 32, 32)
    assert np.allclose(mean, train.mean(axis=0), atol=1e-4)
    stats = json.loads((out / "stats.json").read_text())
    assert stats["images"] == 5 * N_BATCH
    assert np.allclose(stats["rgb_mean"], train.mean(axis=(0, 2, 3)))
    pix = train.transpose(1, 0, 2, 3).reshape(3, -1)
    assert np.allclose(stats["rgb_cov"], np.cov(pix, bias=True), rtol=1e-6)


def test_report_is_like_the_folder_report(archive, archive_cache):
    path, _ = archive
    out, report = archive_cache
    assert report == json.loads((out / "report.json").read_text())
    assert report["status"] == "complete" and report["source"] == "cifar-10 python archive"
    assert report["src"] == str(path.resolve()) and report["notes"] == []
    tr, va = report["splits"]["train"], report["splits"]["val"]
    assert (tr["files"], tr["packed"], va["files"], va["packed"]) == (5 * N_BATCH, 5 * N_BATCH, N_TEST, N_TEST)
    for r in (tr, va):
        assert r["skipped"] == [] and r["notes"] == [] and r["empty_classes"] == []
    assert tr["ignored"] == [{"file": "cifar-10-batches-py/readme.html", "reason": "not a CIFAR-10 batch"}]
    assert tr["members"] == TRAIN and va["members"] == ["test_batch"]


def test_the_loader_reads_the_native_cache(archive_cache):
    out, _ = archive_cache
    cfg = DataConfig(image_size=32, crop_size=24)
    x, y = next(iter(make_loader(out, LoaderSpec("train", 8, seed=0, epoch=0, train=True), cfg, workers=0)))
    assert x.dtype.is_floating_point and str(x.dtype) == "torch.float32" and tuple(x.shape) == (8, 3, 24, 24)
    assert y.shape == (8,) and 0 <= int(y.min()) and int(y.max()) < 10
    x, y = next(iter(make_loader(out, LoaderSpec("val", 4, train=False, ten_patches=True), cfg, workers=0)))
    assert tuple(x.shape) == (4, 10, 3, 24, 24) and str(x.dtype) == "torch.float32"


# ---- other sizes, the command line, ensure_cache -------------------------------------------------------
def test_image_size_64_resizes_every_image_with_pillow(archive, tmp_path):
    path, members = archive
    report = prepare(path, tmp_path / "c64", image_size=64, progress=False)
    ds = PackedDataset(tmp_path / "c64", "val")
    assert ds.image_size == 64 and len(ds) == N_TEST
    images, _ = ds.get_batch(range(len(ds)))
    assert tuple(images.shape) == (N_TEST, 3, 64, 64)
    first = source_images(members, ["test_batch"])[0].transpose(1, 2, 0)
    expected = np.asarray(Image.fromarray(first).resize((64, 64), Image.Resampling.LANCZOS)).transpose(2, 0, 1)
    assert np.array_equal(images[0].numpy(), expected)
    assert np.load(tmp_path / "c64" / "mean.npy").shape == (3, 64, 64)
    assert any("resized from 32x32 to 64x64" in n for n in report["notes"])
    assert report["splits"]["val"]["notes"][0] == {"file": "test_batch#0", "note": "upscaled from 32x32"}


def test_cli_prepares_the_archive(archive, tmp_path, capsys):
    path, _ = archive
    out = tmp_path / "cli"
    assert main(["data", "prepare", "--src", str(path), "--out", str(out), "--image-size", "32", "--no-progress"]) == 0
    assert is_cache(out) and f"{5 * N_BATCH} of {5 * N_BATCH} images packed" in capsys.readouterr().out
    assert main(["data", "info", str(out)]) == 0


def test_ensure_cache_prepares_an_archive_once_and_reuses_it(archive, tmp_path, monkeypatch):
    path, _ = archive
    work = tmp_path / "work"
    cache = ensure_cache(path, work, DataConfig(image_size=32))
    assert cache == default_cache_dir(path, work) and is_cache(cache)
    stamp = (cache / "cache.json").stat().st_mtime_ns

    def refuse(*a, **k):
        raise AssertionError("prepared again")

    monkeypatch.setattr(prep_mod, "prepare", refuse)
    assert ensure_cache(path, work, DataConfig(image_size=32)) == cache
    assert (cache / "cache.json").stat().st_mtime_ns == stamp


def test_is_cifar_archive(archive, tmp_path):
    path, members = archive
    assert is_cifar_archive(path)
    assert is_cifar_archive(write_archive(tmp_path / "plain.tar", members, mode="w"))
    assert not is_cifar_archive(tmp_path)  # a folder
    assert not is_cifar_archive(tmp_path / "missing.tar.gz")
    (tmp_path / "text.tar.gz").write_bytes(b"not an archive")
    assert not is_cifar_archive(tmp_path / "text.tar.gz")
    other = {k: v for k, v in members.items() if k != "batches.meta"}
    assert not is_cifar_archive(write_archive(tmp_path / "nometa.tar.gz", other))


def test_unsorted_label_names_keep_label_order_and_say_so(tmp_path):
    names = NAMES[::-1]
    path = write_archive(tmp_path / "rev.tar.gz", official_members(names))
    report = prepare(path, tmp_path / "c", image_size=32, progress=False)
    assert json.loads((tmp_path / "c" / "classes.json").read_text()) == names
    assert any("not in sorted order" in n for n in report["notes"])


def test_python3_protocol2_pickles_are_read_too(tmp_path):
    """A re-pickled copy (Python 3, protocol 2: bytes via _codecs.encode, numpy._core) reads the same."""
    members = official_members()
    members = {k: v if isinstance(v, bytes) else pickle.dumps(v, protocol=2) for k, v in members.items()}
    out = tmp_path / "c"
    prepare(write_archive(tmp_path / "py3.tar.gz", members), out, image_size=32, progress=False)
    assert np.array_equal(PackedDataset(out, "val").get_batch(range(N_TEST))[0].numpy(),
                          source_images(official_members(), ["test_batch"]))


# ---- unsafe and bad archives ---------------------------------------------------------------------------
def _reduce_call(module: str, name: str, arg: bytes) -> bytes:
    """A protocol-2 pickle that calls module.name(arg) when loaded by a plain pickle.load."""
    return b"\x80\x02c" + f"{module}\n{name}\n".encode() + b"U" + bytes([len(arg)]) + arg + b"\x85R."


def test_a_pickle_naming_any_other_global_is_refused_and_nothing_runs(tmp_path):
    marker = tmp_path / "pwned"
    evil = _reduce_call("os", "system", f"touch {marker}".encode())
    members = official_members()
    members["data_batch_2"] = evil
    path = write_archive(tmp_path / "evil.tar.gz", members)
    with pytest.raises(DataError) as e:
        prepare(path, tmp_path / "c", image_size=32, progress=False)
    msg = str(e.value)
    assert str(path) in msg and "cifar-10-batches-py/data_batch_2" in msg and "os.system" in msg
    assert not marker.exists() and not (tmp_path / "c").exists()
    for module, name in (("posix", "system"), ("builtins", "eval"), ("__builtin__", "eval"),
                         ("subprocess", "call"), ("copy_reg", "_reconstructor")):
        with pytest.raises(DataError, match=f"{module}.{name}"):
            unpickle(_reduce_call(module, name, b"x"), "member")
    # _codecs.encode only re-encodes latin-1 text, as a Python 3 pickler of bytes uses it
    rot = b"\x80\x02c_codecs\nencode\nX\x01\x00\x00\x00aX\x05\x00\x00\x00rot13\x86R."
    with pytest.raises(DataError, match="rot13"):
        unpickle(rot, "member")


def _without(name):
    def f(m):
        del m[name]
    return f


def _set(member, key, value):
    def f(m):
        m[member][key] = value(m[member]) if callable(value) else value
    return f


BAD = {
    "missing data_batch_3": (_without("data_batch_3"), ["*/data_batch_3"]),
    "missing test_batch": (_without("test_batch"), ["*/test_batch"]),
    "missing batches.meta": (_without("batches.meta"), ["*/batches.meta"]),
    "float data": (_set("data_batch_2", b"data", lambda b: b[b"data"].astype(np.float32)),
                   ["cifar-10-batches-py/data_batch_2", "float32 [24, 3072]", "uint8 [N, 3072]"]),
    "wrong row length": (_set("test_batch", b"data", lambda b: b[b"data"][:, :1024].copy()),
                         ["cifar-10-batches-py/test_batch", "uint8 [20, 1024]"]),
    "label count": (_set("data_batch_5", b"labels", lambda b: b[b"labels"][:-1]),
                    ["cifar-10-batches-py/data_batch_5", "23 labels for 24 images"]),
    "label too large": (_set("data_batch_1", b"labels", lambda b: [10] + b[b"labels"][1:]),
                        ["cifar-10-batches-py/data_batch_1", "label 10 of image 0", "outside 0..9"]),
    "negative label": (_set("test_batch", b"labels", lambda b: b[b"labels"][:3] + [-1] + b[b"labels"][4:]),
                       ["cifar-10-batches-py/test_batch", "label -1 of image 3"]),
    "not a pickle": (lambda m: m.__setitem__("data_batch_4", b"garbage, not a pickle"),
                     ["cifar-10-batches-py/data_batch_4", "not a readable pickle"]),
}


@pytest.mark.parametrize("case", list(BAD))
def test_a_bad_archive_is_one_clear_error_naming_the_file_and_member(case, tmp_path):
    change, expected = BAD[case]
    members = official_members()
    change(members)
    path = write_archive(tmp_path / "bad.tar.gz", members)
    with pytest.raises(DataError) as e:
        prepare(path, tmp_path / "out", image_size=32, progress=False)
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg
    for part in expected:
        assert part in msg, (part, msg)
    assert not (tmp_path / "out").exists()  # checked in full before the cache is touched


@pytest.mark.parametrize("cut", ["half", "trailer"])
def test_a_truncated_download_is_named_as_such(archive, tmp_path, cut):
    data = archive[0].read_bytes()
    bad = tmp_path / "cifar-10-python.tar.gz"
    bad.write_bytes(data[: len(data) // 2] if cut == "half" else data[:-4])  # trailer: gzip's length field
    with pytest.raises(DataError, match="truncated") as e:
        prepare(bad, tmp_path / "out", image_size=32, progress=False)
    assert str(bad) in str(e.value) and not (tmp_path / "out").exists()


def test_a_file_that_is_not_a_tar_is_named(tmp_path):
    bad = tmp_path / "cifar-10-python.tar.gz"
    bad.write_bytes(b"<html>404 not found</html>")
    with pytest.raises(DataError, match="not a tar archive") as e:
        prepare(bad, tmp_path / "out", progress=False)
    assert str(bad) in str(e.value)
    assert main(["data", "prepare", "--src", str(bad), "--out", str(tmp_path / "o"), "--no-progress"]) == 2


def test_the_cifar100_archive_is_refused_by_name(tmp_path):
    members = {"train": {b"data": np.zeros((2, 3072), np.uint8), b"fine_labels": [0, 1]},
               "test": {b"data": np.zeros((2, 3072), np.uint8), b"fine_labels": [0, 1]},
               "meta": {b"fine_label_names": [b"apple", b"aquarium_fish"]}}
    path = write_archive(tmp_path / "cifar-100-python.tar.gz", members, top="cifar-100-python")
    with pytest.raises(DataError, match="only CIFAR-10's python archive") as e:
        prepare(path, tmp_path / "out", progress=False)
    assert "CIFAR-100" in str(e.value) and str(path) in str(e.value)


def test_a_corrupted_download_fails_gzips_check(archive, tmp_path):
    data = bytearray(archive[0].read_bytes())
    data[len(data) // 2] ^= 0xFF  # inside a batch's pixels: the pickle still loads, the CRC does not match
    bad = tmp_path / "cifar-10-python.tar.gz"
    bad.write_bytes(bytes(data))
    with pytest.raises(DataError, match="corrupt archive .*CRC") as e:
        prepare(bad, tmp_path / "out", image_size=32, progress=False)
    assert str(bad) in str(e.value) and not (tmp_path / "out").exists()
