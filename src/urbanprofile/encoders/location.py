"""Location encoders: multi-scale sinusoidal features and GeoCLIP's pretrained GPS encoder (512-d).

Both take an ``(n, 2)`` array of ``(lat, lon)`` degrees.

:class:`SinusoidalLocationEncoder` is the encoder behind ``raw-location``: the centroid in local kilometres
(equirectangular about an origin) with sin/cos at wavelengths from 0.5 to 64 km. It is computed directly
(no weights, no cache).

:class:`GeoCLIPLocationEncoder` re-implements the location tower of GeoCLIP (Vivanco Cepeda et al., NeurIPS
2023): coordinates are projected with the Equal Earth projection (Savric et al. 2018) and scaled to about
[-1, 1]; three random-Fourier-feature branches (Gaussian matrices of 256 x 2 with sigma 2^0, 2^4, 2^8, the
sampled matrices are part of the weights) each feed an MLP 512 -> 1024 -> 1024 -> 1024 -> 512 (ReLU); the
three branch outputs are summed and L2-normalised, as GeoCLIP does before its image-GPS similarity. The
weights are the ``location_encoder_weights.pth`` that ships in the ``geoclip`` wheel (install it
``--no-deps``): the file is located through the package metadata without importing ``geoclip`` (which needs
torchvision) and read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from urbanprofile.data.features import sinusoidal_location
from urbanprofile.encoders.cache import ModalityEncoder, digest
from urbanprofile.errors import DataError, MissingDependencyError

PIP_HINT = "pip install --no-deps geoclip (the location-encoder weights ship in its wheel)"
GEOCLIP_WEIGHTS = "geoclip/model/weights/location_encoder_weights.pth"
DEFAULT_WAVELENGTHS_KM = (0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0)
KM_PER_DEG = 111.32


def check_latlon(latlon: Any) -> np.ndarray:
    """Validate an ``(n, 2)`` array of ``(lat, lon)`` degrees."""
    array = np.asarray(latlon, dtype=float)
    if array.ndim != 2 or array.shape[1] != 2:
        raise DataError(f"locations must be an (n, 2) array of (lat, lon), got shape {array.shape}")
    if not np.isfinite(array).all():
        raise DataError(f"location {int(np.argmax(~np.isfinite(array).all(1)))} is not finite")
    bad = (np.abs(array[:, 0]) > 90) | (np.abs(array[:, 1]) > 180)
    if bad.any():
        row = int(np.argmax(bad))
        raise DataError(f"location {row} = {tuple(array[row])} is not (lat, lon) degrees")
    return array


def local_km(latlon: np.ndarray, origin: tuple[float, float] | None = None) -> np.ndarray:
    """(lat, lon) -> local (x, y) km, equirectangular about ``origin`` (default: the mean location)."""
    lat0, lon0 = origin if origin is not None else (float(latlon[:, 0].mean()), float(latlon[:, 1].mean()))
    x = (latlon[:, 1] - lon0) * KM_PER_DEG * np.cos(np.deg2rad(lat0))
    y = (latlon[:, 0] - lat0) * KM_PER_DEG
    return np.column_stack([x, y])


class SinusoidalLocationEncoder(ModalityEncoder):
    """Multi-scale sinusoidal features of locations (the ``raw-location`` features).

    Args:
        origin: ``(lat, lon)`` of the local plane's origin; default the mean of the locations encoded.
        wavelengths_km: Wavelengths of the sin/cos features.
    """

    def __init__(
        self,
        origin: tuple[float, float] | None = None,
        wavelengths_km: tuple[float, ...] = DEFAULT_WAVELENGTHS_KM,
    ) -> None:
        self.origin = origin
        self.wavelengths_km = wavelengths_km
        self.name = "sinusoidal-" + "-".join(f"{w:g}" for w in wavelengths_km)
        self.dim = 2 + 4 * len(wavelengths_km)

    def item_key(self, item: Any) -> bytes:
        return digest(np.asarray(item, dtype=float).tobytes())

    def _encode_batch(self, items: Sequence[Any]) -> np.ndarray:
        return self.encode(np.asarray(items))

    def encode(self, items: Any, *, cache: bool = True, progress: bool = True) -> np.ndarray:
        """Features of ``(lat, lon)`` rows: (n, 2 + 4 * len(wavelengths_km)); cheap, so never cached."""
        latlon = check_latlon(items)
        if not self.wavelengths_km or min(self.wavelengths_km) <= 0:
            raise ValueError(f"wavelengths_km must be positive, got {self.wavelengths_km}")
        return sinusoidal_location(local_km(latlon, self.origin), tuple(self.wavelengths_km)).astype(np.float32)


# -- GeoCLIP --------------------------------------------------------------------------------------------

# Equal Earth projection constants (Savric, Patterson, Jenny 2018).
_A1, _A2, _A3, _A4 = 1.340264, -0.081106, 0.000893, 0.003796
#: GeoCLIP scales the projected coordinates by this over 180 (about [-1, 1]).
_GEOCLIP_SCALE = 66.50336
SIGMAS = (2.0**0, 2.0**4, 2.0**8)


def equal_earth(latlon: np.ndarray) -> np.ndarray:
    """Equal Earth projection of (lat, lon) degrees, in GeoCLIP's scaling: (n, 2) as (x, y)."""
    lat, lon = np.deg2rad(latlon[:, 0]), np.deg2rad(latlon[:, 1])
    theta = np.arcsin(np.sqrt(3.0) / 2.0 * np.sin(lat))
    t2 = theta**2
    x = 2.0 * np.sqrt(3.0) * lon * np.cos(theta) / (3.0 * (9 * _A4 * t2**4 + 7 * _A3 * t2**3 + 3 * _A2 * t2 + _A1))
    y = theta * (_A1 + _A2 * t2 + _A3 * t2**3 + _A4 * t2**4)
    return np.column_stack([x, y]) * _GEOCLIP_SCALE / 180.0


def geoclip_weights() -> Path:
    """The location-encoder weight file inside the installed ``geoclip`` wheel (geoclip is not imported)."""
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        dist = distribution("geoclip")
    except PackageNotFoundError:
        raise MissingDependencyError(f"the GeoCLIP location encoder needs its weights: {PIP_HINT}") from None
    path = Path(str(dist.locate_file(GEOCLIP_WEIGHTS)))
    if not path.is_file():
        raise MissingDependencyError(f"{path}: GeoCLIP weight file missing; reinstall: {PIP_HINT}")
    return path


def geoclip_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("geoclip")
    except PackageNotFoundError:
        return "missing"


def _build_geoclip() -> Any:
    import torch
    from torch import nn

    class FourierBranch(nn.Module):
        """One scale: x -> [cos 2 pi B x, sin 2 pi B x] -> MLP -> 512."""

        def __init__(self) -> None:
            super().__init__()
            self.b = nn.Parameter(torch.zeros(256, 2), requires_grad=False)
            self.hidden = nn.Sequential(
                nn.Linear(512, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU()
            )
            self.out = nn.Linear(1024, 512)

        def forward(self, xy: torch.Tensor) -> torch.Tensor:
            phase = 2 * np.pi * xy @ self.b.T
            return self.out(self.hidden(torch.cat([torch.cos(phase), torch.sin(phase)], dim=-1)))

    class GeoCLIPLocation(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.branches = nn.ModuleList(FourierBranch() for _ in SIGMAS)

        def forward(self, xy: torch.Tensor) -> torch.Tensor:
            summed = torch.stack([branch(xy) for branch in self.branches]).sum(0)
            return nn.functional.normalize(summed, dim=-1)

    return GeoCLIPLocation()


def _remap_geoclip_state(state: dict[str, Any]) -> dict[str, Any]:
    """The shipped file's keys (``LocEnc{i}.capsule.{0,1,3,5}``, ``LocEnc{i}.head.0``) -> ours."""
    mapping = {"capsule.0.b": "b", "capsule.1": "hidden.0", "capsule.3": "hidden.2", "capsule.5": "hidden.4",
               "head.0": "out"}
    out: dict[str, Any] = {}
    for key, value in state.items():
        branch, _, rest = key.partition(".")
        if not branch.startswith("LocEnc"):
            raise DataError(f"unexpected key {key!r} in the GeoCLIP weight file")
        for old, new in mapping.items():
            if rest == old or rest.startswith(old + "."):
                out[f"branches.{branch[len('LocEnc'):]}.{new}{rest[len(old):]}"] = value
                break
        else:
            raise DataError(f"unexpected key {key!r} in the GeoCLIP weight file")
    return out


class GeoCLIPLocationEncoder(ModalityEncoder):
    """GeoCLIP's pretrained location encoder (512-d, L2-normalised), cached.

    Args:
        batch_size: Locations per forward pass.
        device: Torch device.
    """

    dim = 512

    def __init__(self, batch_size: int = 1024, device: str = "cpu") -> None:
        self.batch_size = batch_size
        self.device = device
        self.name = f"geoclip-location-{geoclip_version()}"
        self._model: Any = None

    def _load(self) -> Any:
        if self._model is None:
            import torch

            model = _build_geoclip()
            weights = geoclip_weights()
            state = torch.load(weights, map_location="cpu", weights_only=True)
            model.load_state_dict(_remap_geoclip_state(state), strict=True)
            self._model = model.to(self.device).eval()
        return self._model

    def item_key(self, item: Any) -> bytes:
        return digest(np.asarray(item, dtype=np.float64).tobytes())

    def _encode_batch(self, items: Sequence[Any]) -> np.ndarray:
        import torch

        xy = torch.from_numpy(equal_earth(np.asarray(items, dtype=float)).astype(np.float32)).to(self.device)
        with torch.inference_mode():
            return self._load()(xy).cpu().numpy().astype(np.float32)

    def encode(self, items: Any, *, cache: bool = True, progress: bool = True) -> np.ndarray:
        """Vectors of ``(lat, lon)`` rows: (n, 512)."""
        latlon = check_latlon(items)
        return super().encode(list(latlon), cache=cache, progress=progress)
