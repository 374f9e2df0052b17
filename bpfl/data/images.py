"""Reading images and masks of any mode, and turning them into CLIP-ready tensors.

The preprocessing follows the authors' code: resize to S x S with bicubic interpolation (the aspect
ratio is ignored), scale to [0, 1], normalise with CLIP's mean and std. Masks are binarised first
and then resized with nearest-neighbour interpolation, so they stay exactly 0/1.

Every failure raises :class:`~bpfl.data.records.DatasetError` naming the file.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .records import DatasetError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

#: File endings the folder readers treat as images (lower case).
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm", ".pgm")
JPEG_EXTENSIONS = (".jpg", ".jpeg")

Image.MAX_IMAGE_PIXELS = None  # large industrial scans are legitimate; we resize them anyway


def is_image_file(path: str | Path) -> bool:
    p = Path(path)
    return p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")


def default_mask_threshold(mask_path: str | Path) -> int:
    """127 for JPEG masks (compression noise around 0 and 255), else 0 (any non-zero value)."""
    return 127 if Path(mask_path).suffix.lower() in JPEG_EXTENSIONS else 0


def open_pil(path: str | Path, kind: str = "image") -> Image.Image:
    """Open and fully decode ``path``; a missing, unreadable or truncated file raises DatasetError."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{kind} file not found: {path}. Check the dataset root and that the file "
                           "was not moved or deleted; `bpfl data check ROOT` lists every missing file.",
                           [(str(path), f"{kind} file not found")])
    try:
        img = Image.open(path)
        img.load()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DatasetError(f"cannot read {kind} {path}: {e}. The file is corrupt, truncated or not an "
                           "image; re-download or re-export it, or remove it from the dataset.",
                           [(str(path), f"unreadable {kind}: {e}")]) from e
    return img


def _to_uint8(a: np.ndarray) -> np.ndarray:
    """Scale a numeric array to uint8 by its type's range, never by clipping.

    Integer data is taken as 16-bit (65535 -> 255, i.e. /257) when it fits in 16 bits, else min-max
    scaled; floats in [0, 1] are multiplied by 255, other floats min-max scaled.
    """
    if a.dtype == np.uint8:
        return a
    if a.dtype == bool:
        return a.astype(np.uint8) * 255
    if np.issubdtype(a.dtype, np.floating):
        a = np.nan_to_num(a.astype(np.float64))
        lo, hi = float(a.min()), float(a.max())
        if lo >= 0.0 and hi <= 1.0:
            return np.round(a * 255.0).astype(np.uint8)
        span = hi - lo if hi > lo else 1.0
        return np.round((a - lo) / span * 255.0).astype(np.uint8)
    a = a.astype(np.int64)
    lo, hi = int(a.min()), int(a.max())
    if lo >= 0 and hi <= 65535:
        return np.round(a / 257.0).astype(np.uint8)
    span = hi - lo if hi > lo else 1
    return np.round((a - lo) / span * 255.0).astype(np.uint8)


def pil_to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode (1, L, LA, P, RGB, RGBA, CMYK, I, I;16, F, ...) to 8-bit RGB.

    16-bit and 32-bit integer images are scaled by 1/257 (65535 -> 255), not clipped; float images
    in [0, 1] are scaled by 255. The alpha channel is dropped.
    """
    if img.mode == "RGB":
        return img
    if img.mode in ("1", "L", "P", "PA", "RGBA", "RGBX", "CMYK", "YCbCr", "LAB", "HSV", "La", "RGBa"):
        return img.convert("RGB")
    if img.mode == "LA":
        return img.convert("L").convert("RGB")
    a = np.asarray(img)
    if a.ndim == 3:  # e.g. 16-bit multi-channel that PIL exposes as an array
        a = a[..., :3]
        return Image.fromarray(_to_uint8(a), "RGB")
    g = _to_uint8(a)
    return Image.fromarray(np.repeat(g[..., None], 3, axis=2), "RGB")


def read_rgb(path: str | Path) -> np.ndarray:
    """The image at ``path`` as an H x W x 3 uint8 array (for display and overlays)."""
    return np.asarray(pil_to_rgb(open_pil(path, "image")))


def mask_to_binary(img: Image.Image, threshold: int = 0) -> np.ndarray:
    """A mask image of any mode to an H x W uint8 array in {0, 1}: 1 where value > ``threshold``.

    Colour masks count a pixel as anomalous when any colour channel exceeds the threshold; palette
    masks use the palette index (VisA-style label images); the alpha channel is ignored.
    """
    if img.mode == "1":
        return np.asarray(img, dtype=np.uint8)
    if img.mode in ("LA", "PA", "La"):
        img = img.getchannel(0)
    a = np.asarray(img)
    if a.ndim == 3:
        a = a[..., :3].max(axis=2) if a.shape[2] >= 3 else a[..., 0]
    return (a > threshold).astype(np.uint8)


def image_to_tensor(img: Image.Image, size: int | None, normalize: bool = True) -> torch.Tensor:
    """RGB PIL image -> float tensor [3, S, S] (bicubic resize, CLIP normalisation)."""
    img = pil_to_rgb(img)
    if size is not None and img.size != (size, size):
        img = img.resize((size, size), Image.BICUBIC)
    t = torch.from_numpy(np.array(img, dtype=np.float32, copy=True)).permute(2, 0, 1).div_(255.0)
    if normalize:
        mean = torch.tensor(CLIP_MEAN, dtype=torch.float32).view(3, 1, 1)
        std = torch.tensor(CLIP_STD, dtype=torch.float32).view(3, 1, 1)
        t = (t - mean) / std
    return t


def mask_to_tensor(mask: np.ndarray, size: int | None) -> torch.Tensor:
    """Binary H x W array -> float tensor [S, S] in {0, 1} (nearest-neighbour resize)."""
    m = Image.fromarray((mask > 0).astype(np.uint8) * 255, "L")
    if size is not None and m.size != (size, size):
        m = m.resize((size, size), Image.NEAREST)
    return torch.from_numpy((np.asarray(m) > 127).astype(np.float32))


def load_image(path: str | Path, size: int | None = 518, normalize: bool = True) -> torch.Tensor:
    """Read one image file as the model's input: float tensor [3, S, S] (``size=None``: keep size)."""
    return image_to_tensor(open_pil(path, "image"), size, normalize)


def load_mask(path: str | Path, size: int | None = 518, threshold: int | None = None) -> torch.Tensor:
    """Read one mask file as a float tensor [S, S] in {0, 1}; ``threshold=None``: see
    :func:`default_mask_threshold`."""
    thr = default_mask_threshold(path) if threshold is None else threshold
    return mask_to_tensor(mask_to_binary(open_pil(path, "mask"), thr), size)


def denormalize(image: torch.Tensor) -> torch.Tensor:
    """Undo the CLIP normalisation: [..., 3, H, W] -> values in [0, 1] for display."""
    mean = torch.tensor(CLIP_MEAN, dtype=image.dtype, device=image.device).view(3, 1, 1)
    std = torch.tensor(CLIP_STD, dtype=image.dtype, device=image.device).view(3, 1, 1)
    return (image * std + mean).clamp(0, 1)
