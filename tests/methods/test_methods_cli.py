"""``tokenreduce methods``: the Rich table, --json, --markdown, a name filter."""
import json

import tokenreduce.methods as M
from tokenreduce.cli import main


def test_table_lists_every_method(capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    for name in M.available():
        assert name in out
    assert "projector" in out and "cls_attn" in out and "keep=" in out


def test_json(capsys):
    assert main(["methods", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in rows] == M.available()
    tome = next(r for r in rows if r["name"] == "tome")
    assert tome["stage"] == "vit" and "keys" in tome["needs"] and "r" in tome["options"]


def test_filter_markdown_verbose_and_unknown(capsys):
    assert main(["methods", "visionzip", "dart", "--markdown"]) == 0
    out = capsys.readouterr().out
    assert out == M.markdown_table(["dart", "visionzip"])
    assert main(["methods", "divprune", "-v"]) == 0
    out = capsys.readouterr().out
    assert "faithful to" in out and "tome" not in out
    assert main(["methods", "nope"]) == 2
    assert "unknown method(s): nope" in capsys.readouterr().out
