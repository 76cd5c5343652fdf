"""One checkpoint schema for every client, with the memplan plan inside.

A checkpoint is one ``torch.save`` file (``OUT/last.pt``; pose also keeps ``OUT/best.pt``)::

    {"format": "memplan-client-checkpoint", "version": 1, "client": "pose" | "femur" | "face" | "head",
     "config": {...JSON-able training config...},
     "models": {name: state_dict},          # the original (uncompiled) modules: they load without memplan
     "compiled": {name: state_dict},        # only where REV replaced passes: the substituted network's state
     "plans": {name: plan JSON or None},    # memplan's plan of each compiled module
     "epoch": int, "history": [...], "extra": {...client data, e.g. the face graph prior...}}

Writes are atomic (a temporary file renamed into place), so a crash never leaves half a checkpoint.
"""
from __future__ import annotations

import os
import pickle
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch

from models.errors import ClientError

__all__ = ["FORMAT", "VERSION", "CHECKPOINT_NAME", "Checkpoint", "save_checkpoint", "load_checkpoint_file",
           "checkpoint_file"]

FORMAT = "memplan-client-checkpoint"
VERSION = 1
CHECKPOINT_NAME = "last.pt"


@dataclass(frozen=True, eq=False)
class Checkpoint:
    """A client's training state; ``models`` hold state_dicts of the uncompiled modules."""

    client: str
    config: Mapping[str, Any]
    models: Mapping[str, Mapping[str, torch.Tensor]]
    plans: Mapping[str, str | None] = field(default_factory=dict)
    compiled: Mapping[str, Mapping[str, torch.Tensor]] = field(default_factory=dict)
    epoch: int = 0
    history: list = field(default_factory=list)
    extra: Mapping[str, Any] = field(default_factory=dict)


def _cpu(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu() if isinstance(v, torch.Tensor) else v for k, v in state.items()}


def save_checkpoint(path: str | Path, ckpt: Checkpoint) -> Path:
    """Write ``ckpt`` to ``path`` atomically (parent folders created); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"format": FORMAT, "version": VERSION, "client": ckpt.client, "config": dict(ckpt.config),
               "models": {k: _cpu(v) for k, v in ckpt.models.items()},
               "compiled": {k: _cpu(v) for k, v in ckpt.compiled.items()}, "plans": dict(ckpt.plans),
               "epoch": int(ckpt.epoch), "history": list(ckpt.history), "extra": dict(ckpt.extra)}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def checkpoint_file(path: str | Path, name: str = CHECKPOINT_NAME) -> Path:
    """``path`` itself when it is a file, else ``path/name`` (a run folder)."""
    p = Path(path)
    return p / name if p.is_dir() else p


def load_checkpoint_file(path: str | Path, client: str, *, device: str | torch.device = "cpu") -> Checkpoint:
    """Read a checkpoint of ``client`` from ``path`` (a file or a run folder); ClientError naming the fix."""
    p = checkpoint_file(path)
    if not p.is_file():
        raise ClientError(f"checkpoint {str(p)!r} does not exist; train one with "
                          f"`python -m models.{client} train --data DIR --out {p.parent}`")
    try:
        raw = torch.load(p, map_location=device, weights_only=False)
    except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError) as exc:
        raise ClientError(f"{p}: not a readable torch checkpoint ({type(exc).__name__}: {exc}); retrain") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise ClientError(f"{p}: not a memplan client checkpoint (no \"format\": {FORMAT!r}); it was written by "
                          f"another program or an older version: retrain with `python -m models.{client} train`")
    if raw.get("version") != VERSION:
        raise ClientError(f"{p}: checkpoint version {raw.get('version')!r}, this code reads {VERSION}; retrain")
    if raw.get("client") != client:
        raise ClientError(f"{p}: a {raw.get('client')!r} checkpoint, not a {client!r} one; use "
                          f"`python -m models.{raw.get('client')} evaluate` for it")
    return Checkpoint(client=raw["client"], config=raw["config"], models=raw["models"], plans=raw.get("plans", {}),
                      compiled=raw.get("compiled", {}), epoch=raw.get("epoch", 0), history=raw.get("history", []),
                      extra=raw.get("extra", {}))
