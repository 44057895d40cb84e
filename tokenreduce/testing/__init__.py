"""Test-only code: NOT part of the installed package.

Used by ``tests/`` and ``bench/`` from a development checkout (the editable install
finds it; ``setup.py`` excludes ``tokenreduce.testing`` from the built wheel, and
``tests/test_package_contents.py`` checks that). Nothing under ``tokenreduce/`` outside
this folder may import it.

* `tokenreduce.testing.synthetic`: consistent synthetic inputs (CLIP-like ViT outputs,
  ViT and decoder-layer q/k/v).
* `tokenreduce.testing.authors`: the authors' released algorithms re-implemented as
  they run them, the oracles of `tests/methods/` and the baselines of
  `bench/test_bench_methods.py`.
"""
