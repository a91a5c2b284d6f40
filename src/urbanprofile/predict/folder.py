"""Model folders: JSON configuration, skops estimators, safetensors arrays, a manifest of file hashes.

Nothing is unpickled: estimators are read with skops and only urbanprofile's own probe and baseline
embedder classes (plus what scikit-learn and numpy types skops trusts by default) are accepted; arrays are
safetensors; tables are Parquet. A folder is checked whole before anything in it is used: a missing file, a
file whose hash differs from the manifest (edited by hand) or another format version is a one-line error.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from urbanprofile.errors import DataError, require

#: Bumped whenever a folder written by this code could not be read by the previous code, or vice versa.
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
CONFIG = "model.json"
#: Classes of ours that skops may rebuild: the probes and the label-free baseline embedders.
TRUSTED_PREFIXES = (
    "urbanprofile.heads.probes.",
    "urbanprofile.embedders.baselines.raw.",
    "urbanprofile.embedders.baselines.pca.",
    "urbanprofile.data.features.",
)


class ModelFolderError(DataError):
    """A model folder is missing, incomplete, edited by hand or written by another format version."""


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def check_new_folder(out: Path) -> None:
    """Refuse a target we would have to delete or whose parent does not exist (nothing is written)."""
    if not out.parent.is_dir():
        raise ModelFolderError(f"{out}: its folder {out.parent} does not exist")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ModelFolderError(f"{out} already exists and is not an empty folder; choose another --out")


class FolderWriter:
    """Writes a model folder into a hidden temporary folder beside the target and moves it into place at the end."""

    def __init__(self, out: Path) -> None:
        check_new_folder(out)
        self.out = out
        self.tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))

    def json(self, name: str, payload: dict[str, Any]) -> None:
        (self.tmp / name).write_text(json.dumps(payload, indent=2, sort_keys=True, default=_plain) + "\n")

    def skops(self, name: str, estimator: Any) -> None:
        sio = require("skops.io", "predict")
        sio.dump(estimator, self.tmp / name)

    def arrays(self, name: str, arrays: dict[str, np.ndarray]) -> None:
        st = require("safetensors.numpy", "predict")
        st.save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, str(self.tmp / name))

    def torch_weights(self, name: str, module: Any) -> None:
        """A torch module's state dict as safetensors (tensors copied: safetensors refuses shared storage)."""
        st = require("safetensors.torch", "predict")
        st.save_file({k: v.detach().cpu().contiguous().clone() for k, v in module.state_dict().items()},
                     str(self.tmp / name))

    def parquet(self, name: str, frame: Any) -> None:
        frame.to_parquet(self.tmp / name)

    def commit(self, manifest_extra: dict[str, Any]) -> Path:
        files = {p.name: sha256(p) for p in sorted(self.tmp.iterdir()) if p.is_file()}
        for name in files:
            os.chmod(self.tmp / name, 0o644)  # some writers create 0600 files; a model folder is meant to be shared
        self.json(MANIFEST, {"format_version": FORMAT_VERSION, "files": files, **manifest_extra})
        os.chmod(self.tmp, 0o755)
        if self.out.exists():  # an empty folder (checked above): rmdir removes only an empty one
            self.out.rmdir()
        os.replace(self.tmp, self.out)
        return self.out

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


def _plain(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, tuple | set):
        return list(value)
    return str(value)


class FolderReader:
    """Checks a model folder whole (files present, hashes, format version) and reads its parts."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        if not folder.is_dir():
            raise ModelFolderError(f"{folder}: no model folder there (write one with `urbanprofile fit`)")
        manifest_path = folder / MANIFEST
        if not manifest_path.is_file():
            raise ModelFolderError(f"{folder}: {MANIFEST} is missing; not a model folder written by `urbanprofile fit`")
        manifest = _read_json(manifest_path)
        version = manifest.get("format_version")
        if version != FORMAT_VERSION:
            raise ModelFolderError(
                f"{folder}: written with model folder format {version!r} (urbanprofile "
                f"{manifest.get('urbanprofile_version', '?')}); this urbanprofile reads format {FORMAT_VERSION}: "
                "fit the model again")
        files = manifest.get("files")
        if not isinstance(files, dict) or CONFIG not in files:
            raise ModelFolderError(f"{folder / MANIFEST}: no file list naming {CONFIG}")
        for name, digest in files.items():
            path = folder / name
            if Path(name).name != name:
                raise ModelFolderError(f"{folder / MANIFEST}: file name {name!r} points outside the folder")
            if not path.is_file():
                raise ModelFolderError(f"{folder}: {name} is missing")
            if sha256(path) != digest:
                raise ModelFolderError(f"{path}: changed after `urbanprofile fit` wrote it (sha256 differs from "
                                       f"{MANIFEST}); fit the model again")
        self.files = set(files)
        self.manifest = manifest
        self.config = _read_json(folder / CONFIG)

    def _path(self, name: str) -> Path:
        if name not in self.files:
            raise ModelFolderError(f"{self.folder}: {name} is not listed in {MANIFEST}")
        return self.folder / name

    def skops(self, name: str) -> Any:
        sio = require("skops.io", "predict")
        path = self._path(name)
        untrusted = sio.get_untrusted_types(file=path)
        refused = [t for t in untrusted if not t.startswith(TRUSTED_PREFIXES)]
        if refused:
            raise ModelFolderError(f"{path}: holds type {refused[0]!r}, which urbanprofile does not load")
        return sio.load(path, trusted=untrusted)

    def arrays(self, name: str) -> dict[str, np.ndarray]:
        st = require("safetensors.numpy", "predict")
        return dict(st.load_file(str(self._path(name))))

    def parquet(self, name: str) -> Any:
        import pandas as pd

        return pd.read_parquet(self._path(name))


def _read_json(path: Path) -> dict[str, Any]:
    try:
        payload = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ModelFolderError(f"{path}: not readable JSON ({str(err).splitlines()[0]})") from None
    if not isinstance(payload, dict):
        raise ModelFolderError(f"{path}: expected a JSON object")
    return payload
