"""transformers folders in and out: two ``save_pretrained`` folders merged into a third.

``mergec merge A_DIR B_DIR --calibration corpus.txt -o MERGED_DIR`` loads each folder with
``AutoModel`` (offline), tokenises the calibration text with A's tokenizer into fixed-length
windows of one token stream (no padding, so no attention mask is needed) — or, for a folder
of images, preprocesses them with A's image processor — merges, and writes
the merged weights into a copy of model A saved with ``save_pretrained`` (its tokenizer files
beside it): the result loads with ``AutoModel.from_pretrained`` and returns what model A
returns. A merge whose weights do not fit model A's architecture (other widths, a partial zip)
is saved in mergec's own format instead.
"""
from __future__ import annotations

import copy
import os
import shutil
from pathlib import Path

import torch
from torch import nn

from mergec.errors import CheckpointError, MergeError, require_extra
from mergec.ir.fx import OUTPUT_MAP


def is_pretrained_folder(path: str | Path) -> bool:
    return Path(path).is_dir() and (Path(path) / "config.json").is_file()


def load_pretrained(folder: str | Path, progress: bool = True) -> nn.Module:
    """The model of a ``save_pretrained`` folder, loaded offline with ``AutoModel``
    (transformers' progress bars off unless ``progress``)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    require_extra("transformers", "models", f"model folder {str(folder)!r}")
    import transformers
    if not progress:
        transformers.utils.logging.disable_progress_bar()
    try:
        return transformers.AutoModel.from_pretrained(str(folder)).eval()
    except Exception as error:  # noqa: BLE001 - any loading failure is reported the same way
        raise CheckpointError(f"model folder {str(folder)!r}: transformers could not load it: "
                              f"{str(error).splitlines()[0]}") from error


def _reader(auto: str, kind: str, folder: str | Path, calibration: str | Path, what: str,
            instead: str):
    """The ``transformers.<auto>`` saved in ``folder`` (offline), which reads the calibration
    ``what``; an error naming the tensor file to pass ``instead`` where there is none."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    require_extra("transformers", "models", f"{what} calibration")
    import transformers
    try:
        return getattr(transformers, auto).from_pretrained(str(folder))
    except Exception as error:  # noqa: BLE001 - any loading failure is reported the same way
        raise CheckpointError(f"calibration {str(calibration)!r}: no {kind} in {str(folder)!r} "
                              f"to read {what} with ({error}); pass {instead} as a tensor file "
                              "instead") from error


def text_calibration(path: str | Path, tokenizer_folder: str | Path, tokens: int = 128,
                     batch_size: int = 8, batches: int | None = None
                     ) -> list[tuple[torch.Tensor]]:
    """Batches of token ids from a text file: every line tokenised with the folder's tokenizer,
    the ids joined into one stream and cut into windows of ``tokens`` (the last, shorter one
    dropped)."""
    tokenizer = _reader("AutoTokenizer", "tokenizer", tokenizer_folder, path, "text",
                        "token ids")
    lines = [line for line in Path(path).read_text().splitlines() if line.strip()]
    stream = [i for line in lines for i in tokenizer(line, add_special_tokens=True)["input_ids"]]
    windows = len(stream) // tokens
    if windows == 0:
        raise CheckpointError(f"calibration {str(path)!r} holds {len(stream)} tokens, fewer "
                              f"than one window of {tokens}; give more text or fewer tokens")
    ids = torch.tensor(stream[: windows * tokens]).reshape(windows, tokens)
    chunks = [(chunk,) for chunk in ids.split(batch_size)]
    return chunks[:batches] if batches else chunks


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def image_calibration(folder: str | Path, processor_folder: str | Path, batch_size: int = 8,
                      batches: int | None = None) -> list[tuple[torch.Tensor]]:
    """Batches of pixel values from a folder of images (sorted by name), preprocessed by the
    image processor saved in ``processor_folder`` (model A's): resized, normalised, as the
    model was trained to read them."""
    processor = _reader("AutoImageProcessor", "image processor", processor_folder, folder,
                        "images", "pixel values")
    from PIL import Image
    paths = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise CheckpointError(f"calibration {str(folder)!r} holds no images "
                              f"({', '.join(IMAGE_SUFFIXES)})")
    paths = paths[: batch_size * batches] if batches else paths
    chunks = []
    for start in range(0, len(paths), batch_size):
        images = []
        for path in paths[start:start + batch_size]:
            try:
                with Image.open(path) as image:
                    images.append(image.convert("RGB"))
            except OSError as error:
                raise CheckpointError(f"calibration image {str(path)!r} cannot be read: "
                                      f"{error}") from error
        chunks.append((processor(images=images, return_tensors="pt")["pixel_values"],))
    return chunks


def into(merged: nn.Module, model: nn.Module) -> nn.Module:
    """A copy of ``model`` holding the merged module's weights: it returns what ``model``
    returns (a transformers ``ModelOutput``, say). Needs every entry of ``model``'s state dict
    in the merged one at the same shape (a full merge at the model's widths)."""
    state, target = merged.state_dict(), model.state_dict()
    maps = [key for key in state if key.startswith(OUTPUT_MAP)]
    if maps:
        raise MergeError(f"into: the merged module maps its outputs into the models' bases "
                         f"({len(maps)} maps, e.g. {maps[0]!r}: zip merged units of one model "
                         f"at an output, or outputs='both'), which {type(model).__name__} has "
                         "no place for; use the merged module itself, or merge with "
                         "outputs='fixed' or a method that pairs units (permute)")
    wrong = [k for k, v in target.items() if k not in state or state[k].shape != v.shape]
    if wrong:
        raise MergeError(f"into: the merged weights do not fit {type(model).__name__} (e.g. "
                         f"{wrong[0]!r}: {_shape(state.get(wrong[0]))} merged, "
                         f"{tuple(target[wrong[0]].shape)} in the model); a merge at other "
                         "widths or a partial zip has another architecture")
    copied = copy.deepcopy(model)
    shared: dict[int, str] = {}
    for key, value in copied.state_dict(keep_vars=True).items():
        first = shared.setdefault(id(value), key)
        if first != key and not torch.equal(state[first], state[key]):
            raise MergeError(f"into: {type(model).__name__} ties {first!r} to {key!r}, but "
                             "the merge gave them different weights")
    copied.load_state_dict({k: state[k] for k in target})
    return copied.eval()


def _shape(value: torch.Tensor | None) -> str:
    return "absent" if value is None else str(tuple(value.shape))


_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack")


def save_pretrained(merged: nn.Module, model: nn.Module, source: str | Path,
                    folder: str | Path, report: str, overwrite: bool = False) -> Path:
    """Writes the merge as a ``save_pretrained`` folder of model A (``model``, loaded from
    ``source``), with the other files of ``source`` that are not weights (tokenizer, image
    processor) and mergec's report; staged and renamed into place like every result."""
    from mergec.export import staged

    result = into(merged, model)
    folder = Path(folder)
    with staged(folder, overwrite, is_pretrained_folder(folder), "a transformers model folder"
                ) as staging:
        result.save_pretrained(str(staging))
        for path in Path(source).iterdir():  # tokenizer, image processor: what reads inputs
            if path.is_file() and not (staging / path.name).exists() \
                    and path.suffix not in _WEIGHT_SUFFIXES and ".index." not in path.name \
                    and "mergec" not in path.name:
                shutil.copy2(path, staging / path.name)
        (staging / "mergec_report.json").write_text(report)
    return folder
