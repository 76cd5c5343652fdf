"""The dataset layer every client uses: read and write cases on disk, resample them, feed torch.

On-disk format (drop real volumes in by writing exactly this)::

    DIR/
      ID.nii.gz        image, 3D, any float/int dtype (read as float32). Voxel spacing in mm comes from
                       the NIfTI header zooms (``pixdim[1:4]``); the affine maps voxel -> mm.
      ID_mask.nii.gz   optional uint8 label map on the same grid (0 = background).
      ID.json          optional sidecar:
                       {"id": "ID", "shape": [X, Y, Z], "spacing_mm": [sx, sy, sz],
                        "landmarks": {"name": {"voxel": [i, j, k], "mm": [x, y, z]}, ...},
                        ...any extra keys...}

Landmark voxel coordinates are continuous indices into the array as nibabel returns it (axis 0 = i).
Where a landmark gives only ``mm``, the inverse affine converts it. A case ID is any file name stem
without the ``_mask`` suffix. ``save_case`` writes this format; ``load_case`` reads and checks it.

Resampling (``resample_case``) maps the volume onto a network input shape with
``scipy.ndimage.zoom`` (corner-aligned grid: voxel 0 and voxel n-1 keep their physical positions), so
a landmark at voxel ``v`` moves to ``v * (out - 1) / (in - 1)`` and spacing becomes
``spacing * (in - 1) / (out - 1)`` per axis: distances in mm are preserved.
"""
from __future__ import annotations

import gzip
import json
import zlib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping, Sequence

import nibabel as nib
import numpy as np
import torch
from scipy import ndimage
from torch.utils.data import Dataset

from models.errors import DataError

__all__ = ["DataError", "Case", "list_cases", "load_case", "load_landmarks_mm", "save_case", "resample_case",
           "normalize_intensity", "parse_shape", "check_finite",
           "isotropic_shape", "crop_or_pad", "CaseDataset", "IMAGE_SUFFIX", "MASK_SUFFIX"]

IMAGE_SUFFIX = ".nii.gz"
MASK_SUFFIX = "_mask.nii.gz"
_READ_ERRORS = (nib.filebasedimages.ImageFileError, OSError, EOFError, ValueError, zlib.error,
                gzip.BadGzipFile)


@dataclass(frozen=True, eq=False)
class Case:
    """One volume with its spacing, optional label map and landmarks (voxel coordinates, float)."""

    case_id: str
    volume: np.ndarray                      # float32, shape (X, Y, Z)
    spacing_mm: tuple[float, float, float]
    mask: np.ndarray | None = None          # uint8, same shape as volume
    landmarks: Mapping[str, np.ndarray] = field(default_factory=dict)   # name -> (3,) float voxel
    meta: Mapping[str, Any] = field(default_factory=dict)               # the JSON sidecar, as read
    affine: np.ndarray | None = None        # 4x4 voxel -> mm; None means diag(spacing_mm)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.volume.shape)

    def world_affine(self) -> np.ndarray:
        """The voxel -> mm affine (diagonal spacing when none was stored)."""
        if self.affine is not None:
            return np.asarray(self.affine, dtype=np.float64)
        return np.diag([*self.spacing_mm, 1.0])

    def landmark_array(self, names: Sequence[str]) -> np.ndarray:
        """Landmarks ``names`` as an (N, 3) float array of voxel coordinates, in that order."""
        missing = [n for n in names if n not in self.landmarks]
        if missing:
            raise DataError(f"case {self.case_id!r} has no landmark(s) {missing}; its sidecar {self.case_id}.json "
                            f"lists {sorted(self.landmarks)}: add them under \"landmarks\"")
        return np.stack([np.asarray(self.landmarks[n], dtype=np.float64) for n in names])

    def landmarks_mm(self) -> dict[str, np.ndarray]:
        """Landmarks in world mm via the affine."""
        a = self.world_affine()
        return {n: a[:3, :3] @ np.asarray(v, dtype=np.float64) + a[:3, 3] for n, v in self.landmarks.items()}


def list_cases(directory: str | Path) -> list[str]:
    """Sorted case IDs in ``directory`` (every ``ID.nii.gz`` that is not a ``_mask``)."""
    d = Path(directory)
    if not d.is_dir():
        raise DataError(f"dataset directory {str(d)!r} does not exist; pass a folder of ID.nii.gz files "
                        f"(make one with `python -m tools.phantom pose --out {d} --count 8 --seed 0`)")
    ids = sorted(p.name[: -len(IMAGE_SUFFIX)] for p in d.iterdir()
                 if p.name.endswith(IMAGE_SUFFIX) and not p.name.endswith(MASK_SUFFIX))
    if not ids:
        raise DataError(f"dataset directory {str(d)!r} holds no ID.nii.gz images; see models/data.py for the "
                        f"format (or make phantoms with `python -m tools.phantom pose --out {d} --count 8`)")
    return ids


def _read_nifti(path: Path, dtype: type) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float]]:
    """(array, affine, spacing_mm) of a 3D NIfTI; DataError naming ``path`` when unreadable."""
    if not path.is_file():
        raise DataError(f"{path}: no such file; each case needs it (see the format in models/data.py)")
    try:
        img = nib.load(str(path))
        data = np.asarray(img.dataobj)
    except _READ_ERRORS as exc:
        raise DataError(f"{path}: cannot read NIfTI ({type(exc).__name__}: {exc}); the file is corrupt or "
                        f"truncated: re-export it as a gzipped NIfTI-1 with nibabel") from exc
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise DataError(f"{path}: expected a 3D volume, got shape {data.shape}; save one channel per file")
    check_finite(data, path)
    spacing = tuple(float(z) for z in img.header.get_zooms()[:3])
    if not all(np.isfinite(spacing)) or min(spacing) <= 0:
        raise DataError(f"{path}: voxel spacing {spacing} mm is not positive; set the header zooms "
                        f"(img.header.set_zooms) to the voxel size in mm")
    return data.astype(dtype, copy=False), np.asarray(img.affine, dtype=np.float64), spacing


def check_finite(data: np.ndarray, path: str | Path) -> None:
    """Raise DataError naming ``path`` when ``data`` holds NaN or infinite values (they train to a NaN loss).

    >>> check_finite(np.array([0.0, np.nan]), "a.nii.gz")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    models.errors.DataError: a.nii.gz: 1 of 2 voxels are not finite (NaN or inf; first at index (1,)); ...
    """
    if not np.issubdtype(data.dtype, np.floating):
        return
    bad = ~np.isfinite(data)
    count = int(bad.sum())
    if count:
        first = tuple(int(i) for i in np.argwhere(bad)[0])
        raise DataError(f"{path}: {count} of {data.size} voxels are not finite (NaN or inf; first at index {first}); "
                        f"such a case trains to a NaN loss: replace them (e.g. numpy.nan_to_num) or remove the case")


def _read_sidecar(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: invalid JSON ({exc}); fix or delete the sidecar") from exc
    if not isinstance(meta, dict):
        raise DataError(f"{path}: the sidecar must be a JSON object, got {type(meta).__name__}")
    return meta


def _parse_landmarks(meta: Mapping[str, Any], affine: np.ndarray, path: Path) -> dict[str, np.ndarray]:
    """name -> (3,) voxel coordinates from the sidecar's "landmarks" (voxel, else mm via inverse affine)."""
    raw = meta.get("landmarks", {})
    if not isinstance(raw, dict):
        raise DataError(f"{path}: \"landmarks\" must map names to {{\"voxel\": [i,j,k]}}, got {type(raw).__name__}")
    inverse = np.linalg.inv(affine)
    out: dict[str, np.ndarray] = {}
    for name, entry in raw.items():
        if isinstance(entry, dict) and "voxel" in entry:
            value = np.asarray(entry["voxel"], dtype=np.float64)
        elif isinstance(entry, dict) and "mm" in entry:
            value = inverse[:3, :3] @ np.asarray(entry["mm"], dtype=np.float64) + inverse[:3, 3]
        else:
            raise DataError(f"{path}: landmark {name!r} is {entry!r}; write {{\"voxel\": [i, j, k]}} or "
                            f"{{\"mm\": [x, y, z]}}")
        if value.shape != (3,) or not np.all(np.isfinite(value)):
            raise DataError(f"{path}: landmark {name!r} has coordinates {value.tolist()}; need 3 finite numbers")
        out[name] = value
    return out


def load_case(directory: str | Path, case_id: str) -> Case:
    """Read case ``case_id`` (image, optional mask and sidecar) from ``directory`` and check it."""
    d = Path(directory)
    image_path = d / f"{case_id}{IMAGE_SUFFIX}"
    volume, affine, spacing = _read_nifti(image_path, np.float32)
    mask = None
    mask_path = d / f"{case_id}{MASK_SUFFIX}"
    if mask_path.exists():
        mask, _, _ = _read_nifti(mask_path, np.uint8)
        if mask.shape != volume.shape:
            raise DataError(f"{mask_path}: mask shape {mask.shape} differs from image shape {volume.shape}; "
                            f"resample the mask onto the image grid")
    sidecar = d / f"{case_id}.json"
    meta = _read_sidecar(sidecar)
    if "shape" in meta and tuple(meta["shape"]) != volume.shape:
        raise DataError(f"{sidecar}: \"shape\" {meta['shape']} differs from {image_path.name} shape "
                        f"{list(volume.shape)}; the sidecar belongs to another volume")
    landmarks = _parse_landmarks(meta, affine, sidecar)
    return Case(case_id, volume, spacing, mask, landmarks, meta, affine)


def load_landmarks_mm(directory: str | Path, case_id: str, *, grid: bool = False) -> dict[str, np.ndarray]:
    """Landmarks of ``case_id`` in mm from its sidecar alone (no image read): for pose libraries.

    Uses each landmark's "mm" entry, else its "voxel" entry times the sidecar's "spacing_mm".
    ``grid=True`` always takes voxel x spacing: the frame of predictions made on the voxel grid
    (no affine rotation or flip, so a pose keeps its handedness).
    """
    path = Path(directory) / f"{case_id}.json"
    if not path.is_file():
        raise DataError(f"{path}: no such file; landmarks need the sidecar ID.json (see models/data.py)")
    meta = _read_sidecar(path)
    spacing = np.asarray(meta.get("spacing_mm", [np.nan] * 3), dtype=np.float64)
    out: dict[str, np.ndarray] = {}
    for name, entry in (meta.get("landmarks") or {}).items():
        if isinstance(entry, dict) and "mm" in entry and not grid:
            out[name] = np.asarray(entry["mm"], dtype=np.float64)
        elif isinstance(entry, dict) and "voxel" in entry and np.all(np.isfinite(spacing)):
            out[name] = np.asarray(entry["voxel"], dtype=np.float64) * spacing
        else:
            need = '"voxel" and "spacing_mm"' if grid else '"mm", or "voxel" and "spacing_mm"'
            raise DataError(f"{path}: landmark {name!r} lacks {need}; add them to the sidecar")
        if out[name].shape != (3,):
            raise DataError(f"{path}: landmark {name!r} has coordinates {out[name].tolist()}; need 3 numbers")
    return out


def save_case(directory: str | Path, case: Case) -> Path:
    """Write ``case`` in the format above (image, mask if any, sidecar); returns the image path."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    affine = case.world_affine()
    image = nib.Nifti1Image(np.asarray(case.volume, dtype=np.float32), affine)
    image.header.set_zooms(case.spacing_mm)
    image_path = d / f"{case.case_id}{IMAGE_SUFFIX}"
    nib.save(image, str(image_path))
    if case.mask is not None:
        mask = nib.Nifti1Image(np.asarray(case.mask, dtype=np.uint8), affine)
        mask.header.set_zooms(case.spacing_mm)
        nib.save(mask, str(d / f"{case.case_id}{MASK_SUFFIX}"))
    mm = case.landmarks_mm()
    sidecar = {**{k: v for k, v in case.meta.items() if k not in ("id", "shape", "spacing_mm", "landmarks")},
               "id": case.case_id, "shape": list(case.shape), "spacing_mm": [float(s) for s in case.spacing_mm],
               "landmarks": {n: {"voxel": [float(x) for x in v], "mm": [float(x) for x in mm[n]]}
                             for n, v in case.landmarks.items()}}
    (d / f"{case.case_id}.json").write_text(json.dumps(sidecar, indent=1))
    return image_path


def parse_shape(text: str | Sequence[int]) -> tuple[int, int, int]:
    """``"176,112,112"`` or a sequence -> a 3-tuple of positive ints.

    >>> parse_shape("32,16,8")
    (32, 16, 8)
    """
    parts = text.split(",") if isinstance(text, str) else list(text)
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError as exc:
        raise ValueError(f"shape {text!r} is not three integers; write it like 176,112,112") from exc
    if len(shape) != 3 or min(shape) < 2:
        raise ValueError(f"shape {text!r} must be three integers >= 2, like 176,112,112")
    return shape  # type: ignore[return-value]


def resample_case(case: Case, shape: Sequence[int]) -> Case:
    """``case`` on a grid of ``shape`` (linear image, nearest mask), landmarks and spacing tracked.

    >>> c = Case("a", np.zeros((5, 9, 3), np.float32), (1.0, 1.0, 2.0), landmarks={"p": np.array([4., 8., 2.])})
    >>> r = resample_case(c, (9, 5, 5))
    >>> r.spacing_mm, r.landmarks["p"].tolist()
    ((0.5, 2.0, 1.0), [8.0, 4.0, 4.0])
    """
    out = parse_shape(shape)
    if min(case.shape) < 2:
        raise DataError(f"case {case.case_id!r} has shape {case.shape}; every axis needs >= 2 voxels to resample")
    ratio = np.array([(o - 1) / (i - 1) for o, i in zip(out, case.shape)])   # new voxels per old voxel
    factors = np.array(out, dtype=np.float64) / np.array(case.shape)   # zoom sizes the output by round(in * f)
    volume = ndimage.zoom(case.volume, factors, output=np.float32, order=1, mode="nearest")
    mask = None if case.mask is None else ndimage.zoom(case.mask, factors, output=np.uint8, order=0, mode="nearest")
    assert volume.shape == out, f"zoom produced {volume.shape}, wanted {out}"
    spacing = tuple(float(s / r) for s, r in zip(case.spacing_mm, ratio))
    landmarks = {n: np.asarray(v, dtype=np.float64) * ratio for n, v in case.landmarks.items()}
    affine = case.world_affine().copy()
    affine[:3, :3] = affine[:3, :3] / ratio[None, :]
    return replace(case, volume=volume, spacing_mm=spacing, mask=mask, landmarks=landmarks, affine=affine)


def isotropic_shape(case: Case, spacing_mm: float) -> tuple[int, int, int]:
    """The grid that gives ``case`` voxels of ``spacing_mm`` (corner-aligned: (n - 1) s / target + 1 per axis).

    >>> isotropic_shape(Case("a", np.zeros((33, 17, 9), np.float32), (1.3, 2.6, 1.3)), 1.3)
    (33, 33, 9)
    """
    if not spacing_mm > 0:
        raise DataError(f"target spacing must be positive mm, got {spacing_mm}")
    return tuple(int(max(2, round((n - 1) * s / spacing_mm) + 1)) for n, s in zip(case.shape, case.spacing_mm))


def crop_or_pad(case: Case, shape: Sequence[int], *, center: Sequence[float] | None = None) -> Case:
    """``case`` cut to ``shape`` around ``center`` (voxel; default the volume centre): axes that are too
    long are cropped, too short zero-padded (mask 0); landmarks and affine shift with the origin.

    >>> c = crop_or_pad(Case("a", np.ones((6, 2, 4), np.float32), (1, 1, 1), landmarks={"p": np.array([3., 1, 1])}),
    ...                 (4, 4, 4))
    >>> c.shape, c.landmarks["p"].tolist(), float(c.volume[:, 0].sum())
    ((4, 4, 4), [2.0, 2.0, 1.0], 0.0)
    """
    out = parse_shape(shape)
    middle = (np.asarray(case.shape, float) - 1) / 2 if center is None else np.asarray(center, float)
    start = [int(round(m - (o - 1) / 2)) for m, o in zip(middle, out)]     # new voxel 0 sits at old ``start``
    start = [min(max(st, min(0, n - o)), max(0, n - o)) for st, n, o in zip(start, case.shape, out)]
    volume = np.zeros(out, dtype=np.float32)
    mask = None if case.mask is None else np.zeros(out, dtype=case.mask.dtype)
    src = tuple(slice(max(st, 0), min(st + o, n)) for st, n, o in zip(start, case.shape, out))
    dst = tuple(slice(max(-st, 0), max(-st, 0) + (sl.stop - sl.start)) for st, sl in zip(start, src))
    volume[dst] = case.volume[src]
    if mask is not None:
        mask[dst] = case.mask[src]
    shift = np.asarray(start, dtype=np.float64)
    affine = case.world_affine().copy()
    affine[:3, 3] += affine[:3, :3] @ shift
    return replace(case, volume=volume, mask=mask, affine=affine,
                   landmarks={n: np.asarray(v, dtype=np.float64) - shift for n, v in case.landmarks.items()})


def normalize_intensity(volume: np.ndarray) -> np.ndarray:
    """Zero mean, unit variance (a constant volume maps to zeros) as float32."""
    v = np.asarray(volume, dtype=np.float32)
    std = float(v.std())
    return ((v - v.mean()) / std if std > 0 else v - v.mean()).astype(np.float32)


class CaseDataset(Dataset):
    """Cases of ``directory`` resampled to ``input_size``; subclasses turn a Case into a sample.

    ``__getitem__`` returns ``make_sample(resampled case)``; the base sample is
    ``{"image": (1, X, Y, Z) float32 tensor, "spacing_mm": (3,) tensor, "id": str}``.
    ``cache=True`` keeps resampled cases in memory (small datasets, many epochs).
    """

    def __init__(self, directory: str | Path, input_size: Sequence[int], *, case_ids: Sequence[str] | None = None,
                 cache: bool = True):
        self.directory = Path(directory)
        self.input_size = parse_shape(input_size)
        available = list_cases(self.directory)
        self.case_ids = list(case_ids) if case_ids is not None else available
        unknown = sorted(set(self.case_ids) - set(available))
        if unknown:
            raise DataError(f"case id(s) {unknown} not found in {str(self.directory)!r}; it holds {available[:8]}...")
        self._cache: dict[int, Case] | None = {} if cache else None

    def __len__(self) -> int:
        return len(self.case_ids)

    def case(self, index: int) -> Case:
        """The resampled Case at ``index`` (from the cache when enabled)."""
        if self._cache is not None and index in self._cache:
            return self._cache[index]
        case = resample_case(load_case(self.directory, self.case_ids[index]), self.input_size)
        if self._cache is not None:
            self._cache[index] = case
        return case

    def make_sample(self, case: Case) -> dict[str, Any]:
        """Override to add targets; keep the base keys."""
        return {"image": torch.from_numpy(normalize_intensity(case.volume))[None],
                "spacing_mm": torch.tensor(case.spacing_mm, dtype=torch.float32), "id": case.case_id}

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.make_sample(self.case(index))
