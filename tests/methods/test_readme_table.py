"""The README's methods table is generated from the registry (`tokenreduce methods --markdown`);
every shipped method must have its row there, with the same stage and paper."""
from pathlib import Path

import tokenreduce.methods as M

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_lists_every_method_as_generated():
    text = README.read_text()
    names = [n for n in M.available() if M.get(n).__module__.startswith("tokenreduce.methods.")]
    for line in M.markdown_table(names).splitlines()[2:]:
        name = line.split("|")[1].strip()
        assert line in text, f"README methods table is stale for {name}: run `tokenreduce methods --markdown`"
