"""The ``mergec`` command line.

    mergec inspect torchvision:resnet18
    mergec inspect mypackage.models:make_net --kwargs '{"width": 2}' --input-shape 2,3,32,32
    mergec inspect path/to/bert-folder --json
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mergec.errors import CheckpointError, MergecError, require_extra
from mergec.ir.state import METHODS, OUTPUTS, SPEC_OUTPUTS
from mergec.passes import PIPELINE


def _inspect(args: argparse.Namespace) -> int:
    from mergec.api import discover
    from mergec.loading import example_inputs, load_model, parse_kwargs, parse_shape
    from mergec.report import space_graph, space_table, to_dot

    model = load_model(args.model, parse_kwargs(args.kwargs))
    inputs = example_inputs(model, parse_shape(args.input_shape))
    spec = discover(model, inputs, outputs=args.outputs)
    if args.json:
        print(spec.to_json())
    else:
        print(f"{args.model}: {type(model).__name__}")
        print(space_table(spec))
    if args.dot:
        Path(args.dot).write_text(to_dot(space_graph(spec)))
        logging.getLogger("mergec").info("wrote %s", args.dot)
    return 0


def _demo(args: argparse.Namespace) -> int:
    require_extra("sklearn", "lab", "mergec demo")
    from mergec_lab.demo import format_table, run_demo

    print("Merging two CNNs trained on digits 0-4 (A) and 5-9 (B); joint accuracy is the "
          "argmax over all 10 classes on the whole test set.")
    rows = run_demo(width=args.width, epochs=args.epochs, seed=args.seed,
                    progress=not args.quiet)
    print(format_table(rows))
    return 0


def _merge(args: argparse.Namespace) -> int:
    from mergec.pipeline import check_pass_name

    if args.from_report is not None:
        args = _rerun_args(args)
    folders = _pretrained_inputs(args)
    missing = [flag for flag, value in (("MODEL_A", args.model_a), ("MODEL_B", args.model_b),
                                        ("--model", args.model or folders),
                                        ("--calibration", args.calibration)) if not value]
    if missing:
        raise MergecError(f"merge: missing {', '.join(missing)} (or rerun a recorded merge "
                          "with --from-report REPORT.json)")
    check_pass_name(args.stop_after)
    if args.output is None and args.stop_after is None:
        raise MergecError("merge: name the folder for the result (-o FOLDER), or stop early "
                          "with --stop-after PASS")
    output = Path(args.output) if args.output is not None else None
    if output is not None and args.stop_after is not None \
            and PIPELINE.index(args.stop_after) < PIPELINE.index("zip"):
        raise MergecError(f"merge: no merged model after {args.stop_after}; the zip pass "
                          "emits it (stop after zip or repair to save one, or drop -o)")
    if output is not None and output.exists() and not args.force:
        raise MergecError(f"merge: output folder {str(output)!r} already exists; choose a "
                          "new one, or pass --force to replace it")
    with _process_group(args) as (rank, world):
        return _merge_in_group(args, output, rank, world)


def _merge_in_group(args: argparse.Namespace, output: Path | None, rank: int,
                    world: int) -> int:
    from mergec.checkpoints import calibration_batches
    from mergec.ir.state import MergeOptions
    from mergec.merge import report_of, run_merge

    options = MergeOptions(method=args.method, alpha=args.alpha, beta=args.beta,
                           width=_width(args.width), depth_variant=args.depth_variant,
                           unaligned=args.unaligned,
                           repair=None if args.repair == "none" else args.repair,
                           device=args.device, progress=not args.quiet,
                           samples_per_batch=args.samples_per_batch, seed=args.seed,
                           symmetry=args.symmetry, outputs=args.outputs)
    models = _load_models(args)
    if _pretrained_inputs(args) and args.calibration.endswith(".txt"):
        from mergec.pretrained import text_calibration
        calibration = text_calibration(args.calibration, args.model_a, args.tokens,
                                       args.batch_size, args.batches)
    elif _pretrained_inputs(args) and Path(args.calibration).is_dir():
        from mergec.pretrained import image_calibration
        calibration = image_calibration(args.calibration, args.model_a, args.batch_size,
                                        args.batches)
    else:
        calibration = calibration_batches(args.calibration, args.batch_size, args.batches)
    if not calibration:
        raise MergecError(f"merge: the calibration data {args.calibration!r} holds no inputs")
    example = calibration[0]
    planned = {}
    if len(models) > 2:
        state = _merge_many(args, options, models, example, calibration, world)
    elif args.budget is not None:
        state, planned = _to_budget(args, options, models, example, calibration, world)
    else:
        state = run_merge(options, models, example, calibration[rank::world],
                          stop_after=args.stop_after)
    if rank != 0:  # every process holds the same merge; one writes it
        return 0
    report = report_of(state)
    report.budget = planned
    report.inputs = _recorded_inputs(args)
    if args.dump:
        Path(args.dump).write_text(report.to_json())
        print(f"after {state.completed[-1]}: wrote the report to {args.dump}")
    if output is None:
        return 0
    _save(args, state.merged, models[0], report, output)
    if args.plots:
        report.plot(output / "plots")
    return 0


def _merge_many(args: argparse.Namespace, options: Any, models: tuple, example: Any,
                calibration: list, world: int) -> Any:
    """More than two models, merged at once by :func:`mergec.merge_many`; the state it ends
    with, as ``run_merge`` returns it."""
    from mergec.many import merge_many_state

    if args.stop_after is not None or world > 1:
        raise MergecError("merge: --stop-after and process groups merge two models; "
                          f"{len(models)} checkpoints are merged by one process, to the end")
    return merge_many_state(options, models, example, calibration)


def _to_budget(args: argparse.Namespace, options: Any, models: tuple, example: Any,
               calibration: list, world: int) -> tuple[Any, dict]:
    """The merge the size planner chooses (:mod:`mergec.budget`) and its candidates."""
    from mergec.budget import plan_merge

    if args.stop_after is not None or world > 1:
        raise MergecError("merge: --budget plans a whole merge in one process; drop "
                          "--stop-after and run it in one process")
    return plan_merge(options, models, example, calibration, args.budget, args.budget_measure)


def _save(args: argparse.Namespace, merged: Any, model_a: Any, report: Any,
          output: Path) -> None:
    """The result as a ``save_pretrained`` folder of model A when A and B were transformers
    folders and the merged weights fit A's architecture; else in mergec's format."""
    from mergec.errors import MergeError
    from mergec.merge import MergeResult

    if _pretrained_inputs(args):
        from mergec.pretrained import save_pretrained
        try:
            save_pretrained(merged, model_a, args.model_a, output, report.to_json(),
                            overwrite=args.force)
            print(f"merged with {args.method}: wrote {output} (save_pretrained of model A's "
                  "architecture, its tokenizer, mergec_report.json)")
            return
        except MergeError as error:
            if not str(error).startswith("into:"):
                raise
            print(f"{error}: saving in mergec's format instead")
    MergeResult(module=merged, report=report).save(output, overwrite=args.force)
    print(f"merged with {args.method}: wrote {output}/model.py, weights.safetensors, "
          "report.json")


def _pretrained_inputs(args: argparse.Namespace) -> bool:
    """Whether models A and B are transformers folders (an error if only one is)."""
    from mergec.pretrained import is_pretrained_folder

    kinds = [p is not None and is_pretrained_folder(p) for p in (args.model_a, args.model_b)]
    if any(kinds) and not all(kinds):
        raise MergecError("merge: MODEL_A and MODEL_B must both be checkpoint files or both "
                          "transformers folders")
    return all(kinds)


@contextlib.contextmanager
def _process_group(args: argparse.Namespace) -> Iterator[tuple[int, int]]:
    """(rank, world size): under ``torchrun`` (``WORLD_SIZE`` > 1) this process joins the
    process group (NCCL on CUDA, one GPU per local rank; gloo on CPU) and observes every
    world-th calibration batch; statistics are summed over the processes. On leaving, every
    process waits until rank 0 has written the result, then the group is destroyed (a process
    that exits with its group alive can abort in the communication library's threads)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        yield 0, 1
        return
    import torch.distributed as dist

    cuda = args.device is not None and args.device.startswith("cuda")
    if cuda and args.device == "cuda":
        args.device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
    if dist.is_initialized():  # a caller's group: theirs to close
        yield dist.get_rank(), dist.get_world_size()
        return
    dist.init_process_group("nccl" if cuda else "gloo")
    try:
        yield dist.get_rank(), dist.get_world_size()
        dist.barrier()
    finally:
        dist.destroy_process_group()


#: The merge command's arguments that decide its result: a report records them and
#: ``--from-report`` reruns them (the output, the report dump and the display are the rerun's).
RECORDED = ("model_a", "model_b", "more", "model", "kwargs", "kwargs_b", "calibration", "tokens",
            "batch_size",
            "batches", "method", "alpha", "beta", "width", "depth_variant", "unaligned",
            "repair", "samples_per_batch", "seed", "device", "stop_after", "symmetry",
            "outputs", "budget", "budget_measure")
FILES = ("model_a", "model_b", "calibration")
#: What a merge did before an argument was recorded: merges were under permutations only.
BEFORE_RECORDED = {"symmetry": "permutation", "outputs": "fixed", "more": [], "budget": None,
                   "budget_measure": "parameters"}


def _sha256(path: str) -> str | None:
    """A file's SHA-256, or a folder's (over its files' names and contents); None for a
    bundled dataset's name."""
    import hashlib

    place = Path(path)
    files = sorted(p for p in place.rglob("*") if p.is_file()) if place.is_dir() else [place]
    if not place.exists():
        return None
    digest = hashlib.sha256()
    for file_path in files:
        digest.update(str(file_path.relative_to(place) if place.is_dir() else "").encode())
        with open(file_path, "rb") as file:
            for chunk in iter(lambda: file.read(1 << 20), b""):  # noqa: B023 - used at once
                digest.update(chunk)
    return digest.hexdigest()


def _recorded_inputs(args: argparse.Namespace) -> dict:
    """What ``--from-report`` needs to rerun this merge: its arguments (files as absolute
    paths) and the files' SHA-256."""
    recorded = {name: getattr(args, name) for name in RECORDED}
    for name in FILES:
        if Path(recorded[name]).exists():
            recorded[name] = str(Path(recorded[name]).resolve())
    recorded["more"] = [str(Path(path).resolve()) if Path(path).exists() else path
                        for path in recorded["more"]]
    return {"command": "merge", "arguments": recorded,
            "sha256": {**{name: _sha256(recorded[name]) for name in FILES},
                       "more": [_sha256(path) for path in recorded["more"]]}}


def _rerun_args(args: argparse.Namespace) -> argparse.Namespace:
    """The recorded merge of a report (a result's report.json or a --dump), with this run's
    output, dump and display; refused if a recorded file changed or another argument is
    given beside it."""
    import json

    defaults = vars(build_parser().parse_args(["merge"]))
    given = [name for name in RECORDED if getattr(args, name) != defaults[name]]
    if given:
        raise MergecError(f"merge: --from-report reruns the recorded merge as it was; drop "
                          f"{', '.join('--' + n.replace('_', '-') for n in given)}")
    try:
        inputs = json.loads(Path(args.from_report).read_text())["inputs"]
        recorded, digests = inputs["arguments"], inputs["sha256"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise MergecError(f"merge: {args.from_report!r} is no report of a `mergec merge` run "
                          f"(a result's report.json or a --dump file): {error}") from error
    files = [(name, recorded[name], digests.get(name)) for name in FILES] + list(
        zip(["more"] * len(recorded.get("more", [])), recorded.get("more", []),
            digests.get("more", [])))
    for name, path, digest in files:
        if digest is not None and _sha256(path) != digest:
            raise MergecError(f"merge: {path!r} ({name}) is missing or changed since "
                              f"the report was written (SHA-256 differs); the rerun would not "
                              "be the recorded merge")
    rerun = argparse.Namespace(**vars(args))
    for name in RECORDED:
        # a report written before an argument existed ran what the argument now selects
        setattr(rerun, name, recorded.get(name, BEFORE_RECORDED.get(name, defaults[name])))
    return rerun


def _load_models(args: argparse.Namespace) -> tuple:
    """Models A, B and any more: each transformers folder loaded with ``AutoModel``, or
    ``--model`` built with each one's factory arguments (B's for the further ones) and its
    checkpoint loaded."""
    from mergec.checkpoints import load_checkpoint, with_metadata
    from mergec.loading import load_model, parse_kwargs

    if _pretrained_inputs(args):
        from mergec.pretrained import load_pretrained
        return tuple(load_pretrained(folder, progress=not args.quiet)
                     for folder in (args.model_a, args.model_b, *args.more))
    kwargs = parse_kwargs(args.kwargs)
    kwargs_b = parse_kwargs(args.kwargs_b) if args.kwargs_b else kwargs
    models = []
    checkpoints = [(args.model_a, kwargs), (args.model_b, kwargs_b)]
    for checkpoint, factory_kwargs in checkpoints + [(path, kwargs_b) for path in args.more]:
        model = load_model(args.model, factory_kwargs)
        weights = load_checkpoint(checkpoint)
        try:
            model.load_state_dict(with_metadata(weights, model))
        except RuntimeError as error:
            lines = [line.strip() for line in str(error).splitlines()[1:] if line.strip()]
            more = f" (and {len(lines) - 2} more)" if len(lines) > 2 else ""
            raise CheckpointError(f"merge: checkpoint {checkpoint!r} does not fit --model "
                                  f"{args.model}: {'; '.join(lines[:2])}{more}; check --model "
                                  "and --kwargs") from error
        models.append(model)
    return tuple(models)


def _width(text: str):
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mergec", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log what each pass does")
    commands = parser.add_subparsers(dest="command", required=True)

    inspect = commands.add_parser("inspect", help="discover and print a model's spaces")
    inspect.add_argument("model", help="torchvision:NAME, package.module:factory, or a folder "
                                       "with a transformers model")
    inspect.add_argument("--kwargs", help="JSON object passed to the factory")
    inspect.add_argument("--input-shape", help="example input shape, e.g. 2,3,224,224")
    inspect.add_argument("--outputs", default="auto", choices=SPEC_OUTPUTS,
                         help="which outputs keep their order: auto: labels (logits), not "
                              "the hidden states a transformers backbone returns; fixed: all "
                              "(permutations then keep the function); free: none")
    inspect.add_argument("--json", action="store_true", help="print the unit spec as JSON")
    inspect.add_argument("--dot", help="write the space graph as Graphviz DOT to this file")
    inspect.set_defaults(run=_inspect)

    demo = commands.add_parser("demo", help="merge two CNNs trained on digits 0-4 and 5-9 with "
                                             "every method and print the accuracy table")
    demo.add_argument("--width", type=int, default=16)
    demo.add_argument("--epochs", type=int, default=20)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--quiet", action="store_true", help="no progress bars")
    demo.set_defaults(run=_demo)
    _add_merge_parser(commands)
    return parser


def _add_merge_parser(commands: argparse._SubParsersAction) -> None:
    merge = commands.add_parser("merge", help="merge two (or more) checkpoints of one "
                                              "architecture")
    merge.add_argument("model_a", nargs="?",
                       help="checkpoint of model A (.safetensors or torch.save of a state "
                            "dict), or a transformers save_pretrained folder")
    merge.add_argument("model_b", nargs="?", help="checkpoint (or folder) of model B")
    merge.add_argument("more", nargs="*", default=[],
                       help="further checkpoints (or folders), built as model B is: more than "
                            "two models are merged at once (mergec.merge_many)")
    merge.add_argument("--model", help="architecture of checkpoint files: torchvision:NAME or "
                                       "package.module:factory (not for folders)")
    merge.add_argument("--tokens", type=int, default=128,
                       help="text calibration (a .txt file, with transformers folders): tokens "
                            "per window")
    merge.add_argument("--kwargs", help="JSON object passed to the factory")
    merge.add_argument("--kwargs-b", help="JSON object for model B's factory, when B differs "
                                          "(e.g. another width); default: --kwargs")
    merge.add_argument("--calibration",
                       help="inputs for statistics: a .safetensors/.pt file holding a tensor of "
                            "inputs, or 'digits' / 'fashion-mnist' (training images); with "
                            "transformers folders also a .txt file (A's tokenizer) or a folder "
                            "of images (A's image processor)")
    merge.add_argument("--batch-size", type=int, default=128)
    merge.add_argument("--batches", type=int, default=None, help="use at most this many")
    _add_method_options(merge)
    merge.add_argument("--samples-per-batch", type=int, default=None, metavar="N",
                       help="statistics: at most N pixels or tokens of each batch per space "
                            "(drawn with a fixed seed); default: all")
    merge.add_argument("--device", default=None)
    merge.add_argument("--plots", action="store_true", help="also write report plots")
    merge.add_argument("--quiet", action="store_true", help="no progress bars")
    merge.add_argument("--stop-after", metavar="PASS",
                       help=f"end the pipeline after this pass ({', '.join(PIPELINE)})")
    merge.add_argument("--dump", metavar="FILE",
                       help="write the report (JSON) of the passes that ran to this file")
    merge.add_argument("--seed", type=int, default=0,
                       help="seed of every random choice (sampling, tie-breaking)")
    merge.add_argument("--force", action="store_true",
                       help="replace the output folder if it exists")
    merge.add_argument("--from-report", metavar="REPORT",
                       help="rerun the merge recorded in a report (a result's report.json or a "
                            "--dump); the files must be unchanged")
    merge.add_argument("-o", "--output", help="new folder for the result (needed unless "
                                              "--stop-after ends before zip)")
    merge.set_defaults(run=_merge)


def _add_method_options(merge: argparse.ArgumentParser) -> None:
    """The merge command's options that say how to merge (method, widths, depth, symmetry,
    outputs)."""
    merge.add_argument("--method", default="zip", choices=METHODS)
    merge.add_argument("--alpha", type=float, default=0.5,
                       help="zip: similarity decay of a merged unit (ZipIt's α)")
    merge.add_argument("--beta", type=float, default=0.5,
                       help="zip: within-model merge budget as a fraction of the width (β)")
    merge.add_argument("--width", default="max",
                       help="merged width of each layer: max (default), min, a, b, sum, a "
                            "fraction of d_a + d_b, or an int (elastic zip)")
    merge.add_argument("--depth-variant", default="segment-wise",
                       choices=["segment-wise", "layer-wise"],
                       help="models of different depth: how blocks are compared for alignment")
    merge.add_argument("--unaligned", default="average", choices=["average", "keep"],
                       help="blocks only the deeper model has: averaged with the identity or "
                            "kept")
    merge.add_argument("--repair", default="reset", choices=["reset", "repair", "none"])
    merge.add_argument("--symmetry", default="auto", choices=["auto", "permutation"],
                       help="auto: every space under the largest group the graph allows "
                            "(rotations of a pre-norm transformer's residual stream and "
                            "heads); permutation: permutations only")
    merge.add_argument("--budget", type=int, default=None, metavar="N",
                       help="plan the merge to at most N parameters (or FLOPs per sample, "
                            "--budget-measure flops): the stop point and width that agree best "
                            "with the two models' ensemble on held-out calibration batches")
    merge.add_argument("--budget-measure", default="parameters", choices=["parameters", "flops"])
    merge.add_argument("--outputs", default="auto", choices=OUTPUTS,
                       help="auto: labels (logits) keep their order, a backbone's hidden "
                            "states are matched and returned in A's basis; fixed: every "
                            "output keeps its order; a: every output matched, returned in A's "
                            "basis; both: in A's and in B's, side by side")


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
