"""Training and evaluation helpers for the parent models of examples and benchmarks.

mergec itself never trains; this module exists so that examples and benchmarks can produce the
two parents reproducibly (deterministic given a seed) and only once (``cached_train`` keeps
the state dict as safetensors, keyed by a hash of everything that determines it).

Example::

    >>> from mergec_lab import datasets, training, zoo
    >>> x, y = datasets.digits("train")
    >>> settings = {"epochs": 10, "batch_size": 64, "lr": 0.05, "seed": 0, "width": 16}
    >>> model = training.cached_train(  # doctest: +SKIP
    ...     "digits_cnn", lambda: zoo.digits_cnn(16), settings, x, y)
    >>> training.evaluate(model, *datasets.digits("test"))   # doctest: +SKIP
    0.97...
"""
from __future__ import annotations

import hashlib
import inspect
import json
import logging
import math
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from tqdm.auto import tqdm

from mergec.errors import CheckpointError, MergecError

logger = logging.getLogger(__name__)

DeviceLike = torch.device | str | None


def resolve_device(device: DeviceLike = None) -> torch.device:
    """``device`` as a ``torch.device``; ``None`` means CUDA when available, else CPU."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _make_optimizer(model: nn.Module, optimizer: str, lr: float, weight_decay: float,
                    momentum: float) -> torch.optim.Optimizer:
    """SGD with Nesterov momentum or AdamW; no weight decay on biases and norm parameters."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    if optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=momentum > 0)
    if optimizer == "adam":
        return torch.optim.AdamW(groups, lr=lr)
    raise MergecError(f"train: optimizer must be 'sgd' or 'adam', got {optimizer!r}")


def _make_schedule(optimizer: torch.optim.Optimizer, schedule: str, total_steps: int,
                   lr: float, warmup_fraction: float) -> torch.optim.lr_scheduler.LRScheduler:
    """Per-step learning-rate schedule: one-cycle, or linear warm-up then cosine decay to 0."""
    if schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=lr, total_steps=total_steps, pct_start=max(warmup_fraction, 1e-3),
            cycle_momentum=False)
    if schedule == "cosine":
        warmup_steps = int(warmup_fraction * total_steps)

        def factor(step: int) -> float:
            if step < warmup_steps:
                return (step + 1) / warmup_steps
            progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

        return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    raise MergecError(f"train: schedule must be 'cosine' or 'onecycle', got {schedule!r}")


def _batch_starts(count: int, batch_size: int) -> list[int]:
    """Start offsets of the training batches; a last batch of one example (of several) is left
    out, since BatchNorm cannot compute training statistics from a single value."""
    if batch_size < 1:
        raise MergecError(f"train: batch_size must be positive, got {batch_size}")
    return [start for start in range(0, count, batch_size) if count - start > 1 or count == 1]


def train(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    epochs: int = 10,
    batch_size: int = 128,
    lr: float = 0.05,
    seed: int = 0,
    device: DeviceLike = None,
    progress: bool = True,
    *,
    optimizer: Literal["sgd", "adam"] = "sgd",
    schedule: Literal["cosine", "onecycle"] = "cosine",
    weight_decay: float = 5e-4,
    momentum: float = 0.9,
    warmup_fraction: float = 0.1,
    label_smoothing: float = 0.0,
) -> nn.Module:
    """Trains ``model`` in place on ``(x, y)`` with cross-entropy and returns it, in eval mode.

    Deterministic given ``seed`` on a given device and thread count: the shuffling uses its own
    generator, and the global RNG is seeded (and restored afterwards) for anything stochastic
    inside the model. The whole dataset is moved to ``device`` once (the datasets here are
    small), and the model is left on ``device``. The learning rate follows ``schedule`` per step;
    a final batch of one example is dropped because BatchNorm cannot train on it.
    """
    target = resolve_device(device)
    model.to(target)
    x, y = x.to(target), y.to(target)
    starts = _batch_starts(len(x), batch_size)
    total_steps = max(1, epochs * len(starts))
    opt = _make_optimizer(model, optimizer, lr, weight_decay, momentum)
    scheduler = _make_schedule(opt, schedule, total_steps, lr, warmup_fraction)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
    shuffle_generator = torch.Generator().manual_seed(seed)
    devices = [target.index or 0] if target.type == "cuda" else []

    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        model.train()
        bar = tqdm(total=total_steps, disable=not progress, desc=f"train {type(model).__name__}",
                   unit="batch", leave=False)
        for epoch in range(epochs):
            order = torch.randperm(len(x), generator=shuffle_generator).to(target)
            loss_sum, seen = 0.0, 0
            for start in starts:
                index = order[start:start + batch_size]
                loss = loss_fn(model(x[index]), y[index])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                scheduler.step()
                loss_sum += loss.item() * len(index)
                seen += len(index)
                bar.update(1)
                bar.set_postfix(epoch=epoch, loss=f"{loss.item():.3f}")
            logger.info("epoch %d/%d: mean loss %.4f", epoch + 1, epochs, loss_sum / max(1, seen))
        bar.close()
    return model.eval()


def _concat_outputs(output: torch.Tensor | tuple | list) -> torch.Tensor:
    """A model's logits; a partially zipped model returns one tensor per head, concatenated."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and all(isinstance(o, torch.Tensor) for o in output):
        return torch.cat(list(output), dim=-1)
    raise MergecError(f"predict_logits: model returned {type(output).__name__}, expected a "
                      f"tensor or a tuple of tensors")


@torch.no_grad()
def predict_logits(model: nn.Module, x: torch.Tensor, batch_size: int = 512,
                   device: DeviceLike = None) -> torch.Tensor:
    """The model's outputs on ``x`` in eval mode, batched, gathered on the CPU.

    If the model returns a tuple of tensors (a partially zipped model keeps both parents'
    heads), they are concatenated along the last axis in order, so the argmax over the result
    is the joint-task prediction of the disjoint-task protocol.
    """
    target = resolve_device(device)
    was_training = model.training
    model.eval()
    model.to(target)
    outputs = [_concat_outputs(model(x[start:start + batch_size].to(target))).float().cpu()
               for start in range(0, len(x), batch_size)]
    model.train(was_training)
    return torch.cat(outputs) if outputs else torch.empty(0)


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 512,
             device: DeviceLike = None) -> float:
    """Top-1 accuracy of ``model`` on ``(x, y)``, a float in [0, 1]."""
    if len(x) == 0:
        raise MergecError("evaluate: empty dataset")
    logits = predict_logits(model, x, batch_size, device)
    return (logits.argmax(dim=-1) == y.cpu()).float().mean().item()


_TRAIN_OPTIONS = frozenset(inspect.signature(train).parameters) - {
    "model", "x", "y", "device", "progress"}


def _fingerprint(tensor: torch.Tensor) -> str:
    """sha256 of a tensor's dtype, shape and bytes: the data is part of what a checkpoint is."""
    digest = hashlib.sha256(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
    digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def checkpoint_key(name: str, settings: Mapping[str, Any], model: nn.Module,
                   x: torch.Tensor, y: torch.Tensor) -> str:
    """Hash of the name, the settings, the model's parameter names and shapes, and the data."""
    try:
        settings_json = json.dumps(settings, sort_keys=True, default=str)
    except (TypeError, ValueError) as error:
        raise MergecError(f"cached_train: settings for {name!r} are not JSON-serialisable"
                          ) from error
    architecture = [(key, tuple(value.shape)) for key, value in model.state_dict().items()]
    digest = hashlib.sha256()
    for part in (name, settings_json, repr(architecture), _fingerprint(x), _fingerprint(y)):
        digest.update(part.encode())
        digest.update(b"\0")
    return digest.hexdigest()[:20]


def cached_train(
    name: str,
    factory: Callable[[], nn.Module],
    settings: Mapping[str, Any],
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    cache_dir: str | os.PathLike[str] = "benchmarks/checkpoints",
    device: DeviceLike = None,
    progress: bool = True,
) -> nn.Module:
    """Builds ``factory()`` and trains it on ``(x, y)`` once; later calls load the cached weights.

    ``settings`` is a JSON-serialisable dict. Its keys that are options of :func:`train`
    (``epochs``, ``batch_size``, ``lr``, ``seed``, ``optimizer``, ``schedule``, ...) are passed
    to it; any other keys (e.g. ``{"width": 2, "classes": [0, 1, 2, 3, 4]}``) only describe the
    run and go into the cache key, so put there whatever the factory closes over. The key also
    covers ``name``, the model's parameter names and shapes, and a hash of ``x`` and ``y``, so a
    changed dataset or architecture never reuses a stale checkpoint. The factory is called with
    the global RNG seeded by ``settings["seed"]`` (default 0), so initialisation is reproducible
    too. The file is ``{cache_dir}/{name}-{key}.safetensors`` (``cache_dir`` is relative to the
    working directory); the returned model is in eval mode on ``device``.
    """
    seed = int(settings.get("seed", 0))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = factory()
    path = Path(cache_dir) / f"{name}-{checkpoint_key(name, settings, model, x, y)}.safetensors"
    target = resolve_device(device)
    if path.is_file():
        logger.info("cached_train: loading %s from %s", name, path)
        _load_state(model, path)
        return model.to(target).eval()

    options = {key: value for key, value in settings.items() if key in _TRAIN_OPTIONS}
    logger.info("cached_train: training %s (%s), cache miss for %s", name, options, path)
    train(model, x, y, device=target, progress=progress, **options)
    _save_state(model, path, name, settings)
    return model.eval()


def _save_state(model: nn.Module, path: Path, name: str, settings: Mapping[str, Any]) -> None:
    """Writes the state dict as safetensors atomically (a temporary file, then a rename)."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    state = {key: value.detach().cpu().contiguous().clone()
             for key, value in model.state_dict().items()}
    metadata = {"name": name, "settings": json.dumps(settings, sort_keys=True, default=str)}
    temporary = path.with_suffix(f".tmp{os.getpid()}")
    save_file(state, str(temporary), metadata=metadata)
    os.replace(temporary, path)
    logger.info("cached_train: saved %s", path)


def _load_state(model: nn.Module, path: Path) -> None:
    """Loads a safetensors state dict into ``model``, strictly."""
    from safetensors.torch import load_file

    try:
        state = load_file(str(path))
        model.load_state_dict(state, strict=True)
    except Exception as error:  # a truncated file, or one from another architecture
        raise CheckpointError(f"cached_train: cannot load {path}; delete it to retrain") from error
