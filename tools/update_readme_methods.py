"""Rewrite README.md's methods table from the registry (`tokenreduce methods --markdown`).

    .venv/bin/python tools/update_readme_methods.py
The table is the block of lines starting with ``| method |`` up to the first non-table line;
tests/methods/test_readme_table.py fails when it is stale.
"""
from pathlib import Path

import tokenreduce.methods as methods

readme = Path(__file__).resolve().parents[1] / "README.md"
lines = readme.read_text().splitlines()
table = methods.markdown_table([n for n in methods.available()
                                if methods.get(n).__module__.startswith("tokenreduce.methods.")]).splitlines()
start = next(i for i, line in enumerate(lines) if line.startswith("|") and lines[i + 1].startswith("|---")
             and any(line.startswith(f"| `{n}` |") for n in methods.available() for line in lines[i + 2:i + 3]))
end = start
while end < len(lines) and lines[end].startswith("|"):
    end += 1
readme.write_text("\n".join(lines[:start] + table + lines[end:]) + "\n")
print(f"README.md: methods table rewritten ({len(table) - 2} rows)")
