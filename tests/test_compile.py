"""The emitted module is plain fx code: torch.compile runs it."""
import pytest
import torch

import mergec
from mergec_lab import zoo


@pytest.mark.slow
def test_merged_module_runs_under_torch_compile():
    torch.manual_seed(0)
    model_a, model_b = zoo.digits_cnn(width=8).eval(), zoo.digits_cnn(width=8).eval()
    x = torch.randn(32, 1, 8, 8)
    result = mergec.merge(model_a, model_b, x[:4], [(x,)], progress=False)
    compiled = torch.compile(result.module)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), result.module(x), rtol=1e-4, atol=1e-5)
