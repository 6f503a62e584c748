"""Discover which units of a torchvision model can be permuted, from its graph alone.

``mergec.discover`` exports the model to an fx graph and labels every feature axis with a
*space*: units that can be permuted together (with the weights that produce and consume them)
without changing the function. The script prints the space table (size, structure such as
attention heads or GroupNorm groups, how many parameters each space binds, the probe node where
its features are observed, and why a space is fixed) and writes the spec as JSON.

    python examples/inspect_model.py                        # resnet18, a few seconds
    python examples/inspect_model.py --model vit_b_16 --image-size 224
    python examples/inspect_model.py --model mobilenet_v3_small --json /tmp/spec.json
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
import torchvision

import mergec
from mergec.report import space_table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18",
                        help="a torchvision.models name (resnet18, vit_b_16, convnext_tiny, ...)")
    parser.add_argument("--image-size", type=int, default=64,
                        help="height and width of the example input")
    parser.add_argument("--json", type=Path, default=None,
                        help="where to write the spec (default: a new temporary folder)")
    args = parser.parse_args()

    model = torchvision.models.get_model(args.model, weights=None).eval()
    example = torch.randn(2, 3, args.image_size, args.image_size)
    spec = mergec.discover(model, example)

    print(f"{args.model}: {type(model).__name__}")
    print(space_table(spec))
    free = spec.free_spaces()
    structured = [s for s in free if s.kind != "flat"]
    print(f"{len(free)} free spaces, {len(structured)} of them structured "
          f"({', '.join(sorted({s.kind for s in structured})) or 'none'})")

    path = args.json or Path(tempfile.mkdtemp(prefix="mergec-inspect-")) / f"{args.model}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(spec.to_json())
    print(f"wrote spec JSON to {path}")


if __name__ == "__main__":
    main()
