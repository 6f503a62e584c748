"""What a merge checks of its inputs before any pass runs: the models' weights (finite, of one
dtype, on one device), the device asked for, and the calibration data's container.

Each check raises a :class:`~mergec.errors.MergeError` that names the model, the state-dict
entry or the argument at fault and what to do; checks of single calibration batches (shape,
dtype, arity) run where the batches are read (:func:`mergec.ir.fx.check_batch`), and
non-finite activations are named by collect-stats.
"""
from __future__ import annotations

from typing import Any, Iterable, Sequence

import torch
from torch import nn

from mergec.errors import MergeError

NAMES = "AB"


def _weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {**dict(model.named_parameters()), **dict(model.named_buffers())}


def _name(index: int) -> str:
    return f"model {NAMES[index]}" if index < len(NAMES) else f"model {index}"


def check_models(models: Sequence[nn.Module], example: tuple) -> torch.device | None:
    """Every model's floating weights are finite and of one dtype, all models' the same; every
    weight and every example input is on one device, which is returned (None for models without
    weights)."""
    dtypes, devices = [], []
    for index, model in enumerate(models):
        weights = _weights(model)
        floating = {k: v for k, v in weights.items() if v.is_floating_point()}
        kinds = {v.dtype for v in floating.values()}
        if len(kinds) > 1:
            raise MergeError(f"merge: {_name(index)} mixes weight dtypes "
                             f"({', '.join(sorted(map(str, kinds)))}); cast it to one "
                             "(model.to(torch.float32))")
        dtypes.append(next(iter(kinds), None))
        places = {v.device for v in weights.values()}
        if any(place.type == "meta" for place in places):
            raise MergeError(f"merge: {_name(index)} has weights on the meta device (not "
                             "loaded); load its checkpoint first")
        if len(places) > 1:
            raise MergeError(f"merge: {_name(index)} has weights on several devices "
                             f"({', '.join(sorted(map(str, places)))}); move it to one")
        devices.append(next(iter(places), None))
        _check_finite(index, floating)
    _check_same("dtype", dtypes, "cast one to the other's (model.to(dtype))")
    _check_same("device", devices, "move both to one device (model.to(device)); pass "
                "device=... to merge there")
    place = next((d for d in devices if d is not None), None)
    _check_example(example, place)
    return place


def _check_finite(index: int, floating: dict[str, torch.Tensor]) -> None:
    for key, value in floating.items():
        if not bool(torch.isfinite(value).all()):
            bad = int((~torch.isfinite(value)).sum())
            raise MergeError(f"merge: {_name(index)}'s weight {key!r} holds {bad} NaN or "
                             "infinite entries; merge a checkpoint whose weights are finite")


def _check_same(what: str, values: list, advice: str) -> None:
    known = [(index, value) for index, value in enumerate(values) if value is not None]
    for index, value in known[1:]:
        if value != known[0][1]:
            raise MergeError(f"merge: {_name(known[0][0])}'s weights are {what} {known[0][1]} "
                             f"and {_name(index)}'s {value}; {advice}")


def _check_example(example: tuple, device: torch.device | None) -> None:
    for position, value in enumerate(example):
        if isinstance(value, torch.Tensor) and device is not None and value.device != device:
            raise MergeError(f"merge: example input {position} is on {value.device} and the "
                             f"models' weights on {device}; put them on one device")


def merge_device(asked: str | None, models_device: torch.device | None) -> str | None:
    """Where a merge runs: the device asked for, else the models' own when it is not the CPU
    (models on a GPU are merged there)."""
    if asked is not None or models_device is None or models_device.type == "cpu":
        return asked
    return str(models_device)


def check_device(device: str | None) -> None:
    """A device that this machine has: an error naming what it has otherwise."""
    if device is None:
        return
    place = torch.device(device)
    if place.type == "cuda":
        if not torch.cuda.is_available():
            raise MergeError(f"merge: device {device!r} asked for, but this machine has no "
                             "usable CUDA device (torch.cuda.is_available() is False); pass "
                             "device='cpu' or none")
        if place.index is not None and place.index >= torch.cuda.device_count():
            raise MergeError(f"merge: device {device!r} asked for, but this machine has "
                             f"{torch.cuda.device_count()} CUDA device(s)")
    elif place.type not in ("cpu", "mps", "xpu"):
        raise MergeError(f"merge: device {device!r} cannot run a merge; pass 'cpu' or 'cuda'")


def check_calibration(calibration: Any) -> Iterable[Any]:
    """The calibration data is an iterable of batches (not a bare tensor, string or None)."""
    if isinstance(calibration, torch.Tensor):
        raise MergeError("merge: calibration is one tensor; pass an iterable of batches, e.g. "
                         "[(x,) for x in inputs.split(64)] or mergec.calibration_from_loader("
                         "loader)")
    if isinstance(calibration, (str, bytes)) or not isinstance(calibration, Iterable):
        raise MergeError(f"merge: calibration must be an iterable of batches (each the tuple "
                         f"of forward's inputs), got {type(calibration).__name__}")
    return calibration
