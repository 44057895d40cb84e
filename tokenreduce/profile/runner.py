"""Timing, memory, FLOPs and fidelity of one model with and without a reduction method.

`Timeline` marks points of one call: CUDA events on a GPU (recorded asynchronously, read
after one ``synchronize`` at the end of the call), ``time.perf_counter`` on the CPU (where
every op has finished when it returns). `Probe` puts the marks with forward hooks on the
model's own modules (no monkey-patching of the model code) and wraps the method's
``reduce`` with its own pair of marks, so the time inside the reduction is measured by its
own timer and no host sync is added inside it:

* vision encoder: from the start of the call to the projector (VLM) or to the end (encoder);
* reduction: every call of the method's ``reduce`` (subtracted from the stage it ran in);
* projector: from the projector module (LLaVA's ``multi_modal_projector``, Qwen2-VL's
  ``visual.merger``) to the first LLM call, input assembly included;
* LLM prefill: the first call of the language model (LLM-stage reductions inside it);
* decode per token: from the end of the prefill to the end of the last LLM call, divided by
  the decoding steps (sampling and cache updates included).

Forward pre-hooks also record how many tokens each encoder / LLM layer saw in this call:
the analytic FLOPs (`tokenreduce.profile.flops`) and KV-cache size come from those counts.
"""
from __future__ import annotations

import contextlib
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

from ..methods.base import Method, Stage
from ..models import attention, cpu_linear, fidelity, vit, vlm
from ..models.adapters import model_parts
from . import flops
from .inputs import VisionInputs, VLMInputs

__all__ = ["Timeline", "Probe", "VisionWorkload", "VLMWorkload", "measure", "STAGES", "stage_times"]

STAGES = ("vision", "reduction", "projector", "prefill", "decode_per_token", "total")


class Timeline:
    """Marks of one call (label, event or perf_counter time); `resolve` -> ms since the first."""

    def __init__(self, device: torch.device):
        self.cuda = torch.device(device).type == "cuda"
        self.marks: List[Tuple[str, Any]] = []

    def mark(self, label: str) -> None:
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self.marks.append((label, ev))
        else:
            self.marks.append((label, time.perf_counter()))

    def resolve(self) -> List[Tuple[str, float]]:
        if not self.marks:
            return []
        if self.cuda:
            torch.cuda.synchronize()
            t0 = self.marks[0][1]
            return [(l, float(t0.elapsed_time(e))) for l, e in self.marks]
        t0 = self.marks[0][1]
        return [(l, (t - t0) * 1e3) for l, t in self.marks]


def stage_times(marks: List[Tuple[str, float]]) -> Dict[str, Optional[float]]:
    """Stage durations (ms) of one call from its resolved marks (see the module docstring)."""
    first: Dict[str, float] = {}
    lm_start, lm_end, red = [], [], []
    open_red = None
    for label, t in marks:
        first.setdefault(label, t)
        if label == "lm>":
            lm_start.append(t)
        elif label == "lm<":
            lm_end.append(t)
        elif label == "red>":
            open_red = t
        elif label == "red<" and open_red is not None:
            red.append((open_red, t))
            open_red = None
    end = first["end"]
    out: Dict[str, Optional[float]] = {k: None for k in STAGES}
    if lm_start:
        p0 = first.get("projector>", lm_start[0])
        seg = {"vision": (0.0, p0), "projector": (p0, lm_start[0]), "prefill": (lm_start[0], lm_end[0])}
        out["decode_per_token"] = ((lm_end[-1] - lm_end[0]) / (len(lm_end) - 1)) if len(lm_end) > 1 else None
    else:
        seg = {"vision": (0.0, end)}
    dur = {k: b - a for k, (a, b) in seg.items()}
    for a, b in red:
        mid = 0.5 * (a + b)
        for k, (s, e) in seg.items():
            if s <= mid <= e:
                dur[k] -= b - a
                break
    out.update(dur)
    out["reduction"] = sum(b - a for a, b in red)
    out["total"] = end
    return out


def _hidden(args, kwargs) -> Optional[Tensor]:
    h = args[0] if args else kwargs.get("hidden_states")
    return h if isinstance(h, Tensor) else None


class Probe:
    """Hooks on a model's modules that put marks on the current `Timeline` and count tokens.

    ``vision_layers`` / ``lm_layers``: the blocks whose input token counts give the FLOPs;
    ``projector``, ``lm`` (the decoder stack), ``lm_head`` (first logits, for the KL).
    ``images``: images per call (to split Qwen2-VL's packed ``[sum N, D]`` vision input).
    """

    def __init__(self, vision_layers=(), lm_layers=(), projector: Optional[nn.Module] = None,
                 lm: Optional[nn.Module] = None, lm_head: Optional[nn.Module] = None, images: int = 1):
        self.tl: Optional[Timeline] = None
        self.images = images
        self.vision_tokens: List[Tuple[int, int]] = []
        self.lm_tokens: List[Tuple[int, int]] = []
        self.lm_calls = 0
        self.logits: Optional[Tensor] = None
        self._h = []
        for layer in vision_layers:
            self._h.append(layer.register_forward_pre_hook(self._vision_pre, with_kwargs=True))
        for layer in lm_layers:
            self._h.append(layer.register_forward_pre_hook(self._lm_layer_pre, with_kwargs=True))
        if projector is not None:
            self._h.append(projector.register_forward_pre_hook(lambda m, a: self._mark("projector>")))
            self._h.append(projector.register_forward_hook(lambda m, a, o: self._mark("projector<")))
        if lm is not None:
            self._h.append(lm.register_forward_pre_hook(self._lm_pre))
            self._h.append(lm.register_forward_hook(lambda m, a, o: self._mark("lm<")))
        if lm_head is not None:
            self._h.append(lm_head.register_forward_hook(self._head))

    def begin(self, tl: Timeline) -> None:
        self.tl = tl
        self.vision_tokens, self.lm_tokens, self.lm_calls, self.logits = [], [], 0, None
        tl.mark("start")

    def end(self) -> Timeline:
        tl = self.tl
        tl.mark("end")
        self.tl = None
        return tl

    def _mark(self, label: str) -> None:
        if self.tl is not None:
            self.tl.mark(label)

    def _vision_pre(self, module, args, kwargs):
        h = _hidden(args, kwargs)
        if self.tl is not None and h is not None:
            if h.dim() == 3:
                self.vision_tokens.append((int(h.shape[0]), int(h.shape[1])))
            else:   # packed [sum N, D] (Qwen2-VL): equal images
                self.vision_tokens.append((self.images, int(h.shape[0]) // self.images))

    def _lm_pre(self, module, args):
        if self.tl is not None:
            self.lm_calls += 1
            self.tl.mark("lm>")

    def _lm_layer_pre(self, module, args, kwargs):
        h = _hidden(args, kwargs)
        if self.tl is not None and self.lm_calls == 1 and h is not None:
            self.lm_tokens.append((int(h.shape[0]), int(h.shape[1])))

    def _head(self, module, args, out):
        if self.tl is not None and self.logits is None:
            self.logits = out[:, -1].detach()

    def time_method(self, method: Method) -> Method:
        """Wrap ``method.reduce`` (an instance attribute: the class is untouched) with marks."""
        inner = method.reduce

        def reduce(ctx):
            self._mark("red>")
            out = inner(ctx)
            self._mark("red<")
            return out
        method.reduce = reduce
        return method

    def remove(self) -> None:
        for h in self._h:
            h.remove()
        self._h = []


# ---------------------------------------------------------------------------------------
# workloads: what one timed call is, and how its output is compared with the baseline
# ---------------------------------------------------------------------------------------

def stream_frame(pixel_values: Tensor, t: int) -> Tensor:
    """Frame ``t`` of the image streams (``--frames``): batch row b sees image ``(b - t) mod B`` of
    ``[B, C, H, W]`` pixels; packed pixels (Qwen2-VL ``[sum N, D]``) repeat the same images."""
    return pixel_values.roll(t, 0) if pixel_values.dim() == 4 and t else pixel_values


def run_frames(method: Optional[Method], frames: int, call_frame: Callable[[int], Any]) -> None:
    """``--frames N``: a stateful method (one with ``reset()``) is reset and runs frames 0 .. N-2
    untimed (``call_frame(t)``), so that the timed call is frame N-1 of each stream with its
    temporal state; the baseline and stateless methods run only that frame."""
    if method is None or not callable(getattr(method, "reset", None)):
        return
    method.reset()
    for t in range(frames - 1):
        call_frame(t)


@dataclass
class CallResult:
    output: Any
    tokens_kept: int
    marks: List[Tuple[str, float]]
    vision_tokens: List[Tuple[int, int]]
    lm_tokens: List[Tuple[int, int]]
    logits: Optional[Tensor] = None


class VisionWorkload:
    """A vision encoder (``run_vision``): VIT / PROJECTOR methods."""
    kind = "vision"
    stages = (Stage.VIT, Stage.PROJECTOR)

    def __init__(self, model: nn.Module, inputs: VisionInputs, decoder: Optional[nn.Module] = None,
                 frames: int = 1):
        self.frames = frames
        self.model = vit.prepare(model)
        self.parts = model_parts(model)
        self.inputs = inputs
        self.decoder = decoder
        self.batch = inputs.pixel_values.shape[0]
        g = (inputs.pixel_values.shape[-2] // self.parts.patch, inputs.pixel_values.shape[-1] // self.parts.patch)
        self.image_tokens = g[0] * g[1]
        self.dims = flops.vision_dims(self.parts.vision_config)
        self.probe = Probe(vision_layers=self.parts.vision_layers, images=self.batch)

    def call(self, method: Optional[Method], tl: Timeline) -> CallResult:
        px = self.inputs.pixel_values
        run_frames(method, self.frames, lambda t: vit.run_vision(self.model, stream_frame(px, t), method))
        self.probe.begin(tl)
        out = vit.run_vision(self.model, stream_frame(px, self.frames - 1), method)
        self.probe.end()
        kept = out.last_hidden_state.shape[1] - int(self.parts.has_cls)
        return CallResult(out, int(kept), tl.resolve(), self.probe.vision_tokens, [])

    def fidelity(self, full: CallResult, red: CallResult) -> Dict[str, float]:
        dec = None
        if self.decoder is not None:
            dec = lambda feats, grid: self.decoder(feats.float(), grid)  # noqa: E731
        f = fidelity.encoder_fidelity(full.output, red.output, dec)
        return {k: float(v.float().mean()) for k, v in f.items()}

    def flops(self, res: CallResult) -> Dict[str, Optional[float]]:
        d = self.dims
        fv = sum(s * flops.layer_flops(n, d.d, d.m) for s, n in res.vision_tokens)
        return {"flops_vision": fv, "flops_llm_prefill": None, "flops_decode_per_token": None,
                "flops_total": fv, "kv_cache_bytes": None}


class VLMWorkload:
    """A VLM (`VLMRunner.generate`): every stage; greedy generation of ``new_tokens``.

    ``prepack``: on the CPU, the LLM decoder layers' linears get their weights packed once for
    oneDNN (`tokenreduce.models.cpu_linear`) instead of on every call: one model for the
    baseline and every method, so both sides run the same matmuls (``prepacked_linears``
    counts them; 0 on CUDA or with ``prepack=False``)."""
    kind = "vlm"
    stages = (Stage.VIT, Stage.PROJECTOR, Stage.LLM)

    def __init__(self, model: nn.Module, inputs: VLMInputs, new_tokens: int = 4, frames: int = 1,
                 prepack: bool = True):
        self.frames = frames
        if new_tokens < 1:
            raise ValueError(f"tokenreduce.profile: --new-tokens must be >= 1, got {new_tokens}")
        attention.register()
        model.set_attn_implementation(attention.NAME)   # the same attention for the baseline and every method
        self.model, self.inputs, self.new_tokens = model, inputs, new_tokens
        self.batch = inputs.input_ids.shape[0]
        self.image_tokens = inputs.n_image_tokens
        parts = model_parts(model)
        self.prepacked_linears = 0
        if prepack and model.device.type == "cpu":
            self.prepacked_linears = sum(cpu_linear.prepack_linears(layer) for layer in parts.lm_layers)
        self.vdims = flops.vision_dims(parts.vision_config)
        self.tdims = flops.text_dims(parts.text_config)
        self.elem_bytes = torch.finfo(model.dtype).bits // 8
        self.probe = self._probe()

    def _probe(self) -> Probe:
        parts = model_parts(self.model)
        return Probe(vision_layers=parts.vision_layers, lm_layers=parts.lm_layers, projector=parts.projector,
                     lm=parts.lm, lm_head=parts.lm_head, images=self.batch)

    @contextlib.contextmanager
    def projector(self, module: nn.Module):
        """Run with ``module`` in LLaVA's projector slot (``--projector``); the probe's marks
        follow it; the model's own projector is back afterwards."""
        inner = self.model.model
        own = inner.multi_modal_projector
        inner.multi_modal_projector = module.to(device=self.model.device, dtype=self.model.dtype)
        self.probe.remove()
        self.probe = self._probe()
        try:
            yield module
        finally:
            inner.multi_modal_projector = own
            self.probe.remove()
            self.probe = self._probe()

    def call(self, method: Optional[Method], tl: Timeline) -> CallResult:
        r = vlm.VLMRunner(self.model, method, image_tokens=self.image_tokens or None)
        kw = self.inputs.kwargs()

        def frame(t: int) -> Dict[str, Any]:
            return {**kw, "pixel_values": stream_frame(kw["pixel_values"], t)}
        run_frames(method, self.frames, lambda t: r.generate(max_new_tokens=self.new_tokens, **frame(t)))
        self.probe.begin(tl)
        ids = r.generate(max_new_tokens=self.new_tokens, **frame(self.frames - 1))
        self.probe.end()
        kept = r.last.n_img
        if r.llm_reducer is not None and r.llm_reducer.steps:
            kept = r.llm_reducer.steps[-1]["tokens_out"]
        return CallResult(ids, int(kept), tl.resolve(), self.probe.vision_tokens, self.probe.lm_tokens,
                          self.probe.logits)

    def fidelity(self, full: CallResult, red: CallResult) -> Dict[str, float]:
        out = {"kl": float(fidelity.next_token_kl(full.logits, red.logits).mean()),
               "first_token_agree": float(fidelity.first_token_agreement(full.logits, red.logits).float().mean())}
        a, b = full.output, red.output
        n = min(a.shape[1], b.shape[1])
        out["tokens_agree"] = float((a[:, :n] == b[:, :n]).float().mean())
        return out

    def flops(self, res: CallResult) -> Dict[str, Optional[float]]:
        v, t = self.vdims, self.tdims
        fv = sum(s * flops.layer_flops(n, v.d, v.m) for s, n in res.vision_tokens)
        fl = sum(s * flops.layer_flops(n, t.d, t.m) for s, n in res.lm_tokens)
        B = res.lm_tokens[0][0] if res.lm_tokens else self.batch
        per_layer = [n for _, n in res.lm_tokens]
        return {"flops_vision": fv, "flops_llm_prefill": fl,
                "flops_decode_per_token": flops.decode_step_flops(per_layer, t.d, t.m, B) if self.new_tokens > 1 else None,
                "flops_total": fv + fl,
                "kv_cache_bytes": flops.kv_cache_bytes(per_layer, t.kv_heads, t.head_dim, self.elem_bytes, B)}


# ---------------------------------------------------------------------------------------
# one configuration: warm-up, timed repeats, memory, FLOPs
# ---------------------------------------------------------------------------------------

def _peak_bytes(fn: Callable[[], Any], device: torch.device) -> Optional[int]:
    """Peak tensor bytes one call allocates above what was allocated before it."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return int(torch.cuda.max_memory_allocated() - before)
    from ..measure import peak_extra_bytes
    return peak_extra_bytes(lambda: fn(), ())


def _summary(values: List[Optional[float]]) -> Tuple[Optional[float], Optional[float]]:
    vals = [v for v in values if v is not None]
    if not vals:
        return None, None
    if len(vals) < 2:
        return vals[0], 0.0
    q = statistics.quantiles(vals, n=4, method="inclusive")
    return statistics.median(vals), q[2] - q[0]


@dataclass
class Measurement:
    """Medians / IQRs of each stage (ms), tokens, FLOPs, memory, and the first call's output."""
    times: Dict[str, Optional[float]]
    spread: Dict[str, Optional[float]]
    tokens_kept: int
    flops: Dict[str, Optional[float]]
    peak_mem_bytes: Optional[int]
    first: CallResult
    repeats: int
    raw: List[Dict[str, Optional[float]]] = field(default_factory=list)


def measure(workload, method: Optional[Method], device: torch.device, warmup: int = 1, repeat: int = 3,
            memory: bool = True) -> Measurement:
    """Run ``method`` (None: the unreduced baseline) ``warmup`` + ``repeat`` times on the
    workload's inputs; the first call's output is kept for fidelity."""
    if repeat < 1 or warmup < 0:
        raise ValueError(f"tokenreduce.profile: need repeat >= 1 and warmup >= 0, got {repeat}, {warmup}")
    if method is not None:
        workload.probe.time_method(method)
    first = None
    for _ in range(warmup):
        res = workload.call(method, Timeline(device))
        first = first or res
    raw = []
    last = None
    for _ in range(repeat):
        last = workload.call(method, Timeline(device))
        first = first or last
        raw.append(stage_times(last.marks))
    times, spread = {}, {}
    for k in STAGES:
        times[k], spread[k] = _summary([r[k] for r in raw])
    peak = _peak_bytes(lambda: workload.call(method, Timeline(device)), device) if memory else None
    return Measurement(times, spread, last.tokens_kept, workload.flops(last), peak, first, repeat, raw)

