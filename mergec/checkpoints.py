"""Reading checkpoints and calibration data safely: safetensors, or ``torch.load`` with
``weights_only=True`` (never arbitrary pickles)."""
from __future__ import annotations

import re
from collections import OrderedDict
from pathlib import Path
from typing import Mapping

import torch

from mergec.errors import CheckpointError, require_extra


def read_error(error: BaseException) -> str:
    """Why a file could not be read, in one line. A pickle with more than tensors in it is
    named as such: mergec does not offer to unpickle it (that could run its code)."""
    text = str(error)
    unsafe = re.search(r"Unsupported global: GLOBAL (\S+)", text)
    if "Weights only load failed" in text:
        what = f" (it names {unsafe.group(1)})" if unsafe else ""
        return (f"it is a pickle of more than tensors{what}, which could run code when loaded; "
                "mergec reads only safetensors and weights-only torch files. Where you trust "
                "the file, save its state dict with safetensors.torch.save_file")
    first = re.sub(r"\x1b\[[0-9;]*m", "", text).strip().splitlines()
    return (f"{first[0] if first else type(error).__name__} (the file is corrupt, truncated, or "
            "not a safetensors or torch.save file)")


def load_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from a ``.safetensors`` file or a ``torch.save`` of a state dict (also one
    wrapped as ``{"state_dict": ...}``)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any unreadable file is a CheckpointError
        raise CheckpointError(f"checkpoint {str(path)!r} cannot be read: "
                              f"{read_error(error)}") from error
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"checkpoint {str(path)!r} does not hold a state dict of tensors")
    return state


def with_metadata(state: Mapping[str, torch.Tensor], model: torch.nn.Module
                  ) -> dict[str, torch.Tensor]:
    """``state`` as ``model.load_state_dict`` expects it: with the per-module version metadata
    that ``torch.save`` keeps and safetensors (or a plain dict) loses, taken from ``model``
    where ``state`` has none. Some modules read it on load (torchvision's MNASNet refuses a
    state dict without its version)."""
    out = OrderedDict(state)
    metadata = getattr(state, "_metadata", None)
    out._metadata = metadata if metadata is not None else model.state_dict()._metadata
    return out


def calibration_batches(source: str, batch_size: int = 128, batches: int | None = None
                        ) -> list[tuple[torch.Tensor]]:
    """Calibration batches from a tensor file or a bundled dataset name."""
    if source == "digits":
        require_extra("sklearn", "lab", "calibration 'digits'")
        from mergec_lab.datasets import digits
        inputs = digits("train")[0]
    elif source == "fashion-mnist":
        from mergec_lab.datasets import fashion_mnist
        inputs = fashion_mnist("train")[0]
    else:
        loaded = load_checkpoint(source) if source.endswith(".safetensors") else None
        if loaded is None:
            path = Path(source)
            if not path.is_file():
                raise CheckpointError(f"calibration {source!r}: no such file or dataset name")
            try:
                loaded = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as error:  # noqa: BLE001
                raise CheckpointError(f"calibration {source!r} cannot be read: "
                                      f"{read_error(error)}") from error
        if isinstance(loaded, dict):
            if len(loaded) != 1:
                raise CheckpointError(f"calibration {source!r} must hold one tensor of inputs, "
                                      f"found keys {sorted(loaded)[:5]}")
            loaded = next(iter(loaded.values()))
        if not isinstance(loaded, torch.Tensor):
            raise CheckpointError(f"calibration {source!r} does not hold a tensor")
        inputs = loaded
    if inputs.dim() == 0 or inputs.shape[0] == 0:
        raise CheckpointError(f"calibration {source!r} holds no inputs (shape "
                              f"{tuple(inputs.shape)})")
    chunks = [(chunk,) for chunk in inputs.split(batch_size)]
    return chunks[:batches] if batches else chunks
