"""The ``mergec`` command line.

    mergec inspect torchvision:resnet18
    mergec inspect mypackage.models:make_net --kwargs '{"width": 2}' --input-shape 2,3,32,32
    mergec inspect path/to/bert-folder --json
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from mergec.errors import MergecError


def _inspect(args: argparse.Namespace) -> int:
    from mergec.api import discover
    from mergec.loading import example_inputs, load_model, parse_kwargs, parse_shape
    from mergec.report import space_graph, space_table, to_dot

    model = load_model(args.model, parse_kwargs(args.kwargs))
    inputs = example_inputs(model, parse_shape(args.input_shape))
    spec = discover(model, inputs, fix_outputs=not args.free_outputs)
    if args.json:
        print(spec.to_json())
    else:
        print(f"{args.model}: {type(model).__name__}")
        print(space_table(spec))
    if args.dot:
        Path(args.dot).write_text(to_dot(space_graph(spec)))
        logging.getLogger("mergec").info("wrote %s", args.dot)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mergec", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log what each pass does")
    commands = parser.add_subparsers(dest="command", required=True)

    inspect = commands.add_parser("inspect", help="discover and print a model's spaces")
    inspect.add_argument("model", help="torchvision:NAME, package.module:factory, or a folder "
                                       "with a transformers model")
    inspect.add_argument("--kwargs", help="JSON object passed to the factory")
    inspect.add_argument("--input-shape", help="example input shape, e.g. 2,3,224,224")
    inspect.add_argument("--free-outputs", action="store_true",
                         help="treat model outputs as features (backbones returning hidden "
                              "states)")
    inspect.add_argument("--json", action="store_true", help="print the unit spec as JSON")
    inspect.add_argument("--dot", help="write the space graph as Graphviz DOT to this file")
    inspect.set_defaults(run=_inspect)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(name)s: %(message)s")
    try:
        return args.run(args)
    except MergecError as error:
        print(f"mergec: error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
