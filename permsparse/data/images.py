"""Image feeds ``[B, C, H, W]``: a folder of images (Pillow), a ``.npy`` array, or random images (said loudly)."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx

from permsparse.data.kinds import batches_static, image_spec, model_inputs
from permsparse.errors import PermsparseError
from permsparse.ir.inputs import InputSpec

logger = logging.getLogger(__name__)

Feed = dict[str, np.ndarray]
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)




def _image_geometry(spec: InputSpec, image_size: int | None) -> tuple[int, int, int]:
    c = spec.static(1) or 3
    if c not in (1, 3):
        raise PermsparseError(f"image input {spec.name} has {c} channels; only 1 or 3 are supported")
    default = image_size or 224
    return c, spec.static(2) or default, spec.static(3) or default


def image_feeds(
    model: onnx.ModelProto | str | os.PathLike,
    source: str | os.PathLike | np.ndarray | None,
    batch_size: int = 8,
    samples: int | None = None,
    *,
    image_size: int | None = None,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    seed: int = 0,
) -> list[Feed]:
    """Image feeds ``[B, C, H, W]`` in the model's float dtype.

    Args:
        source: a folder of image files (decoded with Pillow, converted to RGB/L, resized to H×W, scaled to [0, 1]
            and normalized with ``mean``/``std``); a ``.npy`` float array ``[N, C, H, W]`` (or an array) taken as
            already normalized; or ``None`` for random standard-normal images (not real data: a warning says so).
        image_size: H and W when the model's are dynamic (default 224).
    """
    specs = model_inputs(model)
    spec = image_spec(specs)
    if spec is None:
        raise PermsparseError("this model has no 4-D float image input; image feeds do not apply (use text data)")
    others = [s.name for s in specs if s.name != spec.name]
    if others:
        raise PermsparseError(f"image model has extra inputs {others} that image feeds cannot fill")
    c, h, w = _image_geometry(spec, image_size)
    n = samples if samples is not None else 32
    if source is None:
        logger.warning(
            "no calibration images given: using %d RANDOM standard-normal images (not real data); activation-aware "
            "importances and drift numbers from them are only structural. Pass --calib IMAGE_DIR for real ones", n
        )
        arr = np.random.default_rng(seed).standard_normal((n, c, h, w)).astype(np.float32)
    elif isinstance(source, np.ndarray) or Path(source).suffix == ".npy":
        arr = source if isinstance(source, np.ndarray) else np.load(Path(source), mmap_mode="r")
        if arr.ndim != 4 or not np.issubdtype(arr.dtype, np.floating):
            raise PermsparseError(f"an image array must be float [N, C, H, W], got {arr.dtype} {arr.shape}")
        if arr.shape[1:] != (c, h, w) and (spec.static(2) is not None or arr.shape[1] != c):
            raise PermsparseError(f"image array is {arr.shape[1:]}, the model takes {(c, h, w)}; resize/transpose it")
        arr = np.asarray(arr[:n], dtype=np.float32)
        if arr.size and float(np.abs(arr).max()) > 20:
            logger.warning("image array values reach %.1f: .npy images are used as-is (expected already normalized)", float(np.abs(arr).max()))
    else:
        arr = _read_image_folder(Path(source), n, c, h, w, mean, std)
    bsz = batches_static(spec, batch_size)
    if spec.static(0) is not None:
        arr = arr[: (arr.shape[0] // bsz) * bsz]
    if arr.shape[0] == 0:
        raise PermsparseError("no images to build feeds from")
    return [{spec.name: arr[i : i + bsz].astype(spec.dtype)} for i in range(0, arr.shape[0], bsz)]


def _read_image_folder(folder: Path, n: int, c: int, h: int, w: int, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    if not folder.is_dir():
        raise PermsparseError(f"image source {str(folder)!r} is not a folder or a .npy file")
    try:
        from PIL import Image
    except ImportError as exc:
        raise PermsparseError("reading an image folder needs Pillow: pip install pillow (or pass a .npy array)") from exc
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)[:n]
    if not files:
        raise PermsparseError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) under {str(folder)!r}")
    m = np.asarray(mean, dtype=np.float32)[:c].reshape(c, 1, 1)
    s = np.asarray(std, dtype=np.float32)[:c].reshape(c, 1, 1)
    out = np.empty((len(files), c, h, w), dtype=np.float32)
    for i, p in enumerate(files):
        with Image.open(p) as img:
            img = img.convert("RGB" if c == 3 else "L").resize((w, h), Image.BILINEAR)
            a = np.asarray(img, dtype=np.float32) / 255.0
        a = a.reshape(h, w, c).transpose(2, 0, 1)
        out[i] = (a - m) / s
    return out
