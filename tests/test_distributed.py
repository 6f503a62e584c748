"""Merges across processes: under torch.distributed every process observes its shard of the
calibration data, every statistic is summed over the processes, and the merge is the one a single
process computes on all the data."""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

import mergec
from mergec.cli import main as cli_main
from mergec_lab import zoo

ROOT = Path(__file__).resolve().parent.parent
CASES = {
    # collect-stats' moments, the BatchNorm reset and REPAIR's channel statistics
    "zip-repair": dict(depths=(8, 8), method="zip", repair="repair"),
    # align-depth's CKA, then permute and the reset
    "depth": dict(depths=(8, 14), method="permute", repair="reset"),
}


def _models(depths: tuple[int, int]) -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(0)
    model_a = zoo.resnet20(width=0.5, depth=depths[0]).eval()
    torch.manual_seed(1)
    model_b = zoo.resnet20(width=0.5, depth=depths[1]).eval()
    return model_a, model_b


def _calibration() -> list[tuple[torch.Tensor]]:
    x = torch.randn(64, 1, 12, 12, generator=torch.Generator().manual_seed(2))
    return [(chunk,) for chunk in x.split(16)]


def _merge(case: str, calibration: list) -> dict[str, torch.Tensor]:
    settings = CASES[case]
    model_a, model_b = _models(settings["depths"])
    result = mergec.merge(model_a, model_b, _calibration()[0][0][:2], calibration,
                          method=settings["method"], repair=settings["repair"], progress=False)
    return {key: value.contiguous() for key, value in result.module.state_dict().items()}


def _worker(rank: int, init_file: str, folder: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        for case in CASES:
            state = _merge(case, _calibration()[rank::2])
            save_file(state, os.path.join(folder, f"{case}-rank{rank}.safetensors"))
    finally:
        dist.destroy_process_group()


def test_two_processes_merge_exactly_as_one_does() -> None:
    with tempfile.TemporaryDirectory() as folder:
        mp.spawn(_worker, args=(os.path.join(folder, "init"), folder), nprocs=2)
        for case in CASES:
            expected = _merge(case, _calibration())
            for rank in (0, 1):
                state = load_file(os.path.join(folder, f"{case}-rank{rank}.safetensors"))
                assert state.keys() == expected.keys()
                for key, value in expected.items():
                    torch.testing.assert_close(state[key], value, rtol=1e-5, atol=1e-6,
                                               msg=f"{case}: {key} on rank {rank}")


def test_torchrun_merges_and_only_rank_zero_writes(tmp_path: Path) -> None:
    model_a, model_b = _models((8, 8))
    save_file(model_a.state_dict(), tmp_path / "a.safetensors")
    save_file(model_b.state_dict(), tmp_path / "b.safetensors")
    x = torch.cat([batch for (batch,) in _calibration()])
    save_file({"inputs": x}, tmp_path / "calibration.safetensors")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc-per-node", "2",
               "-m", "mergec", "merge",
               str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors"),
               "--model", "mergec_lab.zoo:resnet20", "--kwargs", '{"width": 0.5, "depth": 8}',
               "--calibration", str(tmp_path / "calibration.safetensors"), "--batch-size", "16",
               "--quiet", "-o", str(tmp_path / "merged")]
    run = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("wrote") == 1  # rank 0 only
    single = tmp_path / "single"
    assert cli_main([*command[command.index("merge"):-1], str(single)]) == 0
    merged = load_file(tmp_path / "merged" / "weights.safetensors")
    for key, value in load_file(single / "weights.safetensors").items():
        torch.testing.assert_close(merged[key], value, rtol=1e-5, atol=1e-6, msg=key)
