import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from clipscope import gemm


@pytest.mark.parametrize("batch", [1, 7, 64])
def test_linear_equals_f_linear_to_float_rounding(batch):
    g = torch.Generator().manual_seed(batch)
    x, w, b = torch.randn(batch, 96, generator=g), torch.randn(1000, 96, generator=g), torch.randn(1000, generator=g)
    exact = F.linear(x.double(), w.double(), b.double())
    for out in (gemm.linear(x, w, b), gemm.linear(x, w, None) + b):
        assert out.dtype == torch.float32 and out.shape == (batch, 1000)
        torch.testing.assert_close(out.double(), exact, rtol=1e-5, atol=1e-4)


def test_linear_on_non_contiguous_inputs():
    x = torch.randn(64, 200)[:, ::2]
    w = torch.randn(300, 100)
    torch.testing.assert_close(gemm.linear(x, w, None), F.linear(x, w), rtol=1e-5, atol=1e-4)
    w_t = torch.randn(100, 300).T  # a transposed view, as SAELens' W_enc.T would be
    torch.testing.assert_close(gemm.linear(x, w_t, None), F.linear(x, w_t), rtol=1e-5, atol=1e-4)


def test_linear_keeps_autograd_when_an_input_needs_it():
    x, w = torch.randn(4, 8, requires_grad=True), torch.randn(16, 8)
    out = gemm.linear(x, w, None)
    assert out.grad_fn is not None
    out.sum().backward()
    torch.testing.assert_close(x.grad, w.sum(0).expand(4, 8))


def test_the_kernel_is_chosen_by_the_setting_not_by_timing():
    code = "from clipscope import gemm; print(gemm.cpu_kernel())"
    forced = subprocess.run([sys.executable, "-c", code], env={"CLIPSCOPE_CPU_GEMM": "mkl", "PATH": ""}, capture_output=True, text=True, check=True)
    assert forced.stdout.strip() == "mkl"
    default = subprocess.run([sys.executable, "-c", code], env={"PATH": ""}, capture_output=True, text=True, check=True)
    expected = "onednn" if torch.backends.mkldnn.is_available() else "mkl"
    assert default.stdout.strip() == expected
