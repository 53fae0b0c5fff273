"""The layout table: counts against the paper, costs against the built model, validation errors."""
import pytest
import torch

import splitnet
from splitnet.model.layout import LayerRow, Layout, LayoutError, get_layout, make_layout, with_rows


def test_builtin_layouts_listed():
    assert splitnet.layouts() == ["paper", "dense", "towers", "one-gpu", "one-column", "four-columns", "owt"]


def test_parameter_counts_from_the_paper():
    assert get_layout("paper").params() == 60_965_224
    assert get_layout("dense").params() == 62_378_344
    assert get_layout("one-column").params() == 62_378_344


@pytest.mark.parametrize("name", ["paper", "dense", "towers", "one-gpu", "one-column", "four-columns"])
def test_table_params_equal_the_built_model(name):
    lay = get_layout(name, 10)
    m = splitnet.SplitAlexNet(num_classes=10, layout=name, devices="cpu")
    assert lay.params() == sum(p.numel() for p in m.parameters())


def test_paper_per_layer_params():
    per = {s.name: s.params for s in get_layout("paper").stats()}
    assert per == {"conv1": 34_944, "conv2": 307_456, "conv3": 885_120, "conv4": 663_936,
                   "conv5": 442_624, "fc6": 37_752_832, "fc7": 16_781_312, "fc8": 4_097_000}


@pytest.mark.parametrize("name", ["paper", "dense", "four-columns", "one-gpu"])
def test_macs_equal_a_count_by_hooks(name):
    """Multiply-adds per image from the table == counted on the running model's conv/linear calls."""
    m = splitnet.SplitAlexNet(num_classes=1000, layout=name, devices="cpu").eval()
    counts = []  # appended to, not summed in place: the hooks run in the columns' threads at once

    def hook(mod, inp, out):
        if isinstance(mod, torch.nn.Conv2d):
            k = mod.kernel_size[0] * mod.kernel_size[1] * mod.in_channels // mod.groups
            counts.append(out[0].numel() * k)
        else:
            counts.append(out[0].numel() * mod.in_features)

    hs = [mod.register_forward_hook(hook) for mod in m.modules()
          if isinstance(mod, (torch.nn.Conv2d, torch.nn.Linear))]
    with torch.no_grad():
        m(torch.zeros(1, 3, 224, 224))
    for h in hs:
        h.remove()
    assert get_layout(name).macs_per_image() == sum(counts)


def test_paper_macs_about_0724_g():
    assert abs(get_layout("paper").macs_per_image() / 1e9 - 0.724) < 0.001
    assert abs(get_layout("dense").macs_per_image() / 1e9 - 1.135) < 0.001


def test_paper_exchange_bytes():
    assert get_layout("paper").exchange_bytes_per_image() == {
        "conv3": 2 * 128 * 13 * 13 * 4, "fc6": 2 * 128 * 6 * 6 * 4, "fc7": 2 * 2048 * 4, "fc8": 2048 * 4}
    assert sum(get_layout("paper").exchange_bytes_per_image().values()) == 234_496


def test_one_gpu_is_footnote_2():
    lay = get_layout("one-gpu")
    assert lay.columns == 1
    assert [r.widths[0] for r in lay.rows] == [48, 128, 192, 192, 256, 4096, 4096, 1000]


def test_four_columns_expressible():
    lay = make_layout("four", columns=4)
    assert [r.widths for r in lay.rows][:2] == [(24,) * 4, (64,) * 4]
    assert lay.rows[-1].widths == (1000, 0, 0, 0)
    # conv3 reads all four columns: each of the 4 readers gets 3 foreign tensors.
    conv3 = next(s for s in lay.stats() if s.name == "conv3")
    assert len(conv3.exchanges) == 12


def test_head_column_option():
    lay = make_layout("chm", head=1)
    assert lay.head == 1 and lay.rows[-1].widths == (0, 1000)


def test_with_rows_edits_the_table():
    lay = with_rows(get_layout("paper"), "paper+conv5", conv5={"cross": True})
    assert lay.row("conv5").cross
    assert lay.exchange_bytes_per_image()["conv5"] == 2 * 192 * 13 * 13 * 4
    with pytest.raises(LayoutError, match="conv9"):
        with_rows(get_layout("paper"), conv9={"cross": True})


def _rows(**changes):
    rows = list(get_layout("paper", 10).rows)
    for name, ch in changes.items():
        i = [r.name for r in rows].index(name)
        rows[i] = LayerRow(**{**rows[i].__dict__, **ch})
    return tuple(rows)


def test_validation_width_mismatch_names_the_layer():
    with pytest.raises(LayoutError, match="width mismatch.*conv4"):
        Layout("bad", _rows(conv4={"widths": (192, 96, 96)}))
    with pytest.raises(LayoutError, match="conv2.*not divisible"):
        make_layout("bad", columns=3)


def test_validation_unknown_layer():
    rows = _rows()
    bad = rows[:5] + (LayerRow("conv6", "conv", (64, 64), 3, 1, 1),) + rows[5:]
    with pytest.raises(LayoutError, match="unknown layer 'conv6'"):
        Layout("bad", bad)
    with pytest.raises(LayoutError, match="unknown layer 'fc9'"):
        make_layout(cross=("fc9",))


def test_validation_unused_row():
    # column 1 computes conv4, but conv5 does not cross and column 1 has no conv5 units.
    with pytest.raises(LayoutError, match="unused row.*conv4.*column 1"):
        Layout("bad", _rows(conv5={"widths": (256, 0)}))


def test_validation_reads_a_missing_column():
    with pytest.raises(LayoutError, match="conv4.*column 1.*no conv3"):
        Layout("bad", _rows(conv3={"widths": (384, 0)}))


def test_validation_fc8_on_one_column_and_conv1_cross():
    with pytest.raises(LayoutError, match="fc8"):
        Layout("bad", _rows(fc8={"widths": (5, 5)}))
    with pytest.raises(LayoutError, match="conv1"):
        Layout("bad", _rows(conv1={"cross": True}))


def test_validation_order():
    rows = _rows()
    with pytest.raises(LayoutError, match="out of order"):
        Layout("bad", (rows[0], rows[2], rows[1]) + rows[3:])


def test_unknown_layout_name():
    with pytest.raises(LayoutError, match="unknown layout 'nope'"):
        splitnet.SplitAlexNet(layout="nope", devices="cpu")


def test_table_markdown_mentions_every_layer():
    text = get_layout("paper").table()
    for name in ("conv1", "conv3", "fc8", "60,965,224", "234,496", "all columns"):
        assert name in text
