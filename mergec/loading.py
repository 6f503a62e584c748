"""Loading models named on the command line, with example inputs that fit them.

``MODEL`` is one of

* ``torchvision:NAME`` — a torchvision constructor (random weights, nothing downloaded);
* ``package.module:factory`` — any callable returning an ``nn.Module`` (``--kwargs`` JSON is
  passed to it);
* a local folder holding a transformers model (``config.json`` and weights), loaded offline.
"""
from __future__ import annotations

import importlib
import json
import os
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from mergec.errors import MergecError, require_extra


def load_model(name: str, kwargs: dict[str, Any] | None = None) -> nn.Module:
    """Builds the model ``name`` names (see the module docstring)."""
    kwargs = kwargs or {}
    path = Path(name)
    if path.is_dir():
        return _load_transformers(path)
    if ":" not in name:
        raise MergecError(
            f"model {name!r}: expected torchvision:NAME, package.module:factory or a folder "
            "with a transformers model")
    module_name, attribute = name.split(":", 1)
    if module_name == "torchvision":
        require_extra("torchvision", "models", f"model {name!r}")
        module_name = "torchvision.models"
    try:
        module = importlib.import_module(module_name)
        factory = getattr(module, attribute)
    except (ImportError, AttributeError) as error:
        raise MergecError(f"model {name!r}: cannot import {attribute!r} from {module_name!r}: "
                          f"{error}") from error
    try:
        model = factory(**kwargs)
    except TypeError as error:
        raise MergecError(f"model {name!r}: calling {attribute}(**{kwargs}) failed: {error}. "
                          "Check --kwargs.") from error
    if not isinstance(model, nn.Module):
        raise MergecError(f"model {name!r}: {attribute} returned {type(model).__name__}, "
                          "not a torch.nn.Module")
    return model


def _load_transformers(path: Path) -> nn.Module:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    require_extra("transformers", "models", f"model folder {str(path)!r}")
    try:
        import transformers
        return transformers.AutoModel.from_pretrained(str(path))
    except Exception as error:  # noqa: BLE001 - any loading failure is reported the same way
        raise MergecError(f"model folder {str(path)!r}: transformers could not load it: "
                          f"{error}") from error


def example_inputs(model: nn.Module, shape: Sequence[int] | None = None,
                   batch: int = 2) -> tuple:
    """Example inputs for ``model``: ``shape`` if given, else guessed from a transformers config
    (token ids or pixel values) or a 3×224×224 image."""
    if shape is not None:
        return (torch.randn(*shape),)
    config = getattr(model, "config", None)
    if config is not None:
        if getattr(config, "image_size", None) and getattr(config, "num_channels", None):
            size = config.image_size
            return (torch.randn(batch, config.num_channels, size, size),)
        vocab = getattr(config, "vocab_size", None)
        if vocab:
            return (torch.randint(0, vocab, (batch, 16)),)
    return (torch.randn(batch, 3, 224, 224),)


def parse_shape(text: str | None) -> tuple[int, ...] | None:
    if not text:
        return None
    try:
        return tuple(int(part) for part in text.replace("x", ",").split(","))
    except ValueError as error:
        raise MergecError(f"--input-shape {text!r}: expected integers like 2,3,224,224") from error


def parse_kwargs(text: str | None) -> dict[str, Any]:
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise MergecError(f"--kwargs {text!r} is not JSON: {error}") from error
    if not isinstance(value, dict):
        raise MergecError(f"--kwargs must be a JSON object, got {text!r}")
    return value
