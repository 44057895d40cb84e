"""`tokenreduce profile`: the unreduced model and each method x budget on the same inputs.

* `runner`: timelines (CUDA events / perf_counter), hooks that time the stages and count
  tokens per layer, the reduction's own timer, memory, one configuration's measurement;
* `flops`: FastV's per-layer formula, decoding steps, KV-cache bytes;
* `inputs`: shipped images, per-family preprocessing, prompts for VLMs;
* `sweep`: the baseline + methods x budgets (`Spec`, `run`), the embedded default;
* `report`: Rich table, JSON, CSV, PNG plot.
"""
from .sweep import Spec, run  # noqa: F401
