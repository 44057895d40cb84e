"""`tokenreduce profile`: the unreduced model and each method x budget on the same inputs.

* `runner`: timelines (CUDA events / perf_counter), hooks that time the stages and count
  tokens per layer, the reduction's own timer, memory, one configuration's measurement;
* `flops`: FastV's per-layer formula, decoding steps, KV-cache bytes;
* `inputs`: shipped images, per-family preprocessing, prompts for VLMs;
* `sweep`: the baseline + methods x budgets (`Spec`, `run`), the embedded default;
* `report`: Rich table, JSON, CSV, the fidelity-vs-speedup (Pareto) PNG;
* `main_job`: `tokenreduce profile` with no workload flag (the real DINOv2-S, then the
  LLaVA-1.5-7B architecture with a cut LLM and random weights);
* `show`: `tokenreduce show`, the tokens each method keeps drawn on the image.
"""
from .sweep import Spec, run  # noqa: F401
