"""A person's first contact: bad arguments exit non-zero with one line before anything loads,
unreadable images and unwritable outputs are refused up front, a finished result is never lost,
and no traceback reaches the terminal."""
import json
import os

import numpy as np
import pytest
from PIL import Image

from tokenreduce import cli, output_paths
from tokenreduce.models import presets

TINY = ["profile", "--model", "tiny-dinov2", "--random-weights", "--method", "tome", "--keep", "4",
        "--repeat", "1", "--warmup", "0", "--batch", "1", "--no-memory"]


@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if a model would be built: bad arguments must be caught before."""
    def build(*a, **k):
        raise AssertionError("a model was loaded for bad arguments")
    monkeypatch.setattr(presets, "build", build)


def _one_line_error(capsys, rc, want_rc, *words):
    out = capsys.readouterr()
    text = out.out + out.err
    assert rc == want_rc, text
    assert "Traceback" not in text, text
    for w in words:
        assert w in text, (w, text)
    return text


BAD_PROFILE = [
    (["--keep", "0"], "keep must be a positive int"),
    (["--keep", "-5"], "keep must be a positive int"),
    (["--ratio", "0"], "ratio must be in (0, 1]"),
    (["--ratio", "1.5"], "ratio must be in (0, 1]"),
    (["--ratio", "nan"], "ratio must be in (0, 1]"),
    (["--method", "fastv"], "fastv runs at stage llm"),
    (["--opt", "tome.nope=3"], "tome has no option 'nope'"),
    (["--opt", "nope=3"], "no selected method"),
    (["--method", "nope"], "unknown method 'nope'"),
    (["--device", "tpu"], "--device must be cpu, cuda"),
    (["--device", "meta"], "--device must be cpu, cuda"),
    (["--image-size", "13"], "--image-size 13 is not a multiple"),
    (["--image-size", "0"], "--image-size must be an int >= 1"),
    (["--batch", "0"], "--batch must be an int >= 1"),
    (["--repeat", "0"], "--repeat must be an int >= 1"),
]


@pytest.mark.parametrize("extra,msg", BAD_PROFILE, ids=[" ".join(e) for e, _ in BAD_PROFILE])
def test_bad_profile_arguments_exit_2_before_loading(capsys, no_model, extra, msg):
    args = [a for a in TINY if a not in ("tome",)] if "--method" in extra else list(TINY)
    if "--method" in extra:
        args.remove("--method")
    if "--keep" in extra or "--ratio" in extra:
        i = args.index("--keep")
        del args[i:i + 2]
    _one_line_error(capsys, cli.main(args + extra), 2, msg)


def _images(tmp_path):
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(tmp_path / "ok.png")
    good = (tmp_path / "ok.png").read_bytes()
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.png").write_text("hello\n")
    (tmp_path / "corrupt.png").write_bytes(good[: len(good) // 2] + os.urandom(len(good)))


@pytest.mark.parametrize("name", ["empty", "text", "corrupt"])
def test_unreadable_images_are_one_line_errors(capsys, tmp_path, no_model, name):
    _images(tmp_path)
    rc = cli.main(TINY + ["--images", str(tmp_path / f"{name}.png")])
    _one_line_error(capsys, rc, 2, f"{name}.png")


@pytest.mark.parametrize("flag", ["--json", "--csv", "--plot"])
@pytest.mark.parametrize("where", ["dir", "under-file", "no-write"])
def test_unwritable_outputs_are_refused_before_the_run(capsys, tmp_path, no_model, flag, where):
    if where == "dir":
        target = tmp_path
    elif where == "under-file":
        (tmp_path / "f").write_text("x")
        target = tmp_path / "f" / "out"
    else:
        target = "/proc/tokenreduce-test/out"
    _one_line_error(capsys, cli.main(TINY + [flag, str(target)]), 2, flag)


def test_bench_refuses_bad_numbers_and_paths(capsys, tmp_path):
    _one_line_error(capsys, cli.main(["bench", "--repeat", "0"]), 2, "--repeat must be >= 1")
    _one_line_error(capsys, cli.main(["bench", "--warmup", "-1"]), 2, "--warmup must be >= 0")
    _one_line_error(capsys, cli.main(["bench", "--quick", "--json", str(tmp_path)]), 2, "is a directory")


def test_a_finished_result_is_kept_when_its_file_cannot_be_written(tmp_path):
    calls = []

    def write(report, path):
        calls.append(path)
        if len(calls) == 1:
            raise PermissionError(13, "Permission denied")
        with open(path, "w") as f:
            json.dump(report, f)
        return path

    path, err = output_paths.write_or_keep(write, {"rows": [1, 2]}, str(tmp_path / "x.json"), ".json")
    assert err and "Permission denied" in err and path != calls[0]
    assert json.load(open(path)) == {"rows": [1, 2]}
    os.remove(path)


def test_unexpected_errors_are_one_line(capsys, monkeypatch):
    def boom(args, console):
        raise RuntimeError("something deep broke")
    monkeypatch.setattr(cli, "cmd_info", boom)
    _one_line_error(capsys, cli.main(["info"]), 1, "tokenreduce info: RuntimeError: something deep broke",
                    "TOKENREDUCE_DEBUG")


def test_help_has_no_doubled_percent(capsys):
    with pytest.raises(SystemExit):
        cli.main(["profile", "--help"])
    out = capsys.readouterr().out
    assert "%%" not in out and "50/25/11%" in out


def test_profile_table_headers_fit_160_columns(capsys):
    assert cli.main(TINY) == 0
    out = capsys.readouterr().out
    header = [line for line in out.splitlines() if "method" in line and "budget" in line]
    assert header and all(len(line) <= 160 for line in out.splitlines())
    assert "…" not in "\n".join(header), header
