"""The pass registry names each pass after its module, in pipeline order."""
import importlib

import mergec.passes as passes
from mergec.ir.state import MergeOptions
from mergec.pipeline import build_passes


def test_every_key_is_the_pass_name():
    for key, pass_class in passes.REGISTRY.items():
        assert pass_class.name == key
        module = importlib.import_module(f"mergec.passes.{key.replace('-', '_')}")
        assert getattr(module, pass_class.__name__) is pass_class


def test_the_driver_runs_every_registered_pass_in_order():
    assert tuple(p.name for p in build_passes(MergeOptions())) == passes.PIPELINE
    assert passes.PIPELINE == tuple(passes.REGISTRY)


def test_passes_are_not_a_top_level_package(tmp_path):
    """Installed, the passes are mergec.passes; no top-level `passes` lands in site-packages."""
    import subprocess
    import sys
    code = ("import importlib.util, mergec.passes; "
            "print(importlib.util.find_spec('passes') is None)")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                         text=True, check=True)
    assert out.stdout.strip() == "True"
