"""torch integration: SpQRLinear on torch's current stream, CUDA-graph capture, replace_linear.

Needs torch with CUDA and CuPy (skipped otherwise)."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
cp = pytest.importorskip("cupy")
if not torch.cuda.is_available():
    pytest.skip("no CUDA device", allow_module_level=True)

from spqr_format.api import save  # noqa: E402
from spqr_format.codec.reference import decode_bilevel  # noqa: E402
from spqr_format.gpu.nn import SpQRLinear, replace_linear  # noqa: E402
from spqr_format.gpu.synth import random_packed  # noqa: E402
from spqr_format.gpu.tensor import GpuTensor  # noqa: E402
from spqr_format.spec import DType  # noqa: E402

pytestmark = pytest.mark.gpu


def _ref(p, x: torch.Tensor, bias=None) -> torch.Tensor:
    w = torch.from_numpy(decode_bilevel(p, DType.FLOAT32).astype(np.float64))
    y = x.double().cpu() @ w.T
    if bias is not None:
        y = y + bias.double().cpu()
    return y


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("batch", [1, 3, 16])
def test_spqr_linear_matches_reference(dtype, batch):
    p = random_packed(96, 1000, seed=batch)
    bias = torch.randn(96, device="cuda", dtype=dtype)
    lin = SpQRLinear(GpuTensor.from_packed(p), bias=bias)
    x = torch.randn(batch, 2, 1000, device="cuda", dtype=dtype)
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):  # runs on torch's current stream
        y = lin(x)
    s.synchronize()
    assert y.shape == (batch, 2, 96) and y.dtype == dtype
    ref = _ref(p, x.reshape(-1, 1000), bias).reshape(batch, 2, 96)
    err = (y.double().cpu() - ref).abs().max().item()
    scale = ref.abs().max().item()
    assert err <= (4e-3 if dtype == torch.float16 else 2e-2) * scale


def test_spqr_linear_cuda_graph():
    p = random_packed(256, 2048, seed=5)
    lin = SpQRLinear(GpuTensor.from_packed(p))
    x = torch.randn(1, 2048, device="cuda", dtype=torch.float16)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        y0 = lin(x)  # warm-up: compiles the module outside capture
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        y = lin(x)
    x.copy_(torch.randn_like(x))
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(y, lin(x))  # replay computed with the new x
    assert not torch.equal(y, y0)


def test_replace_linear(tmp_path):
    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.up = torch.nn.Linear(512, 128, bias=True)
            self.down = torch.nn.Linear(128, 64, bias=False)

        def forward(self, x):
            return self.down(self.up(x))

    model = M().cuda().half()
    p_up, p_down = random_packed(128, 512, seed=1), random_packed(64, 128, seed=2)
    path = tmp_path / "m.spqr"
    save(path, {"up.weight": p_up, "down.weight": p_down})
    names = replace_linear(model, path)
    assert sorted(names) == ["down", "up"]
    assert isinstance(model.up, SpQRLinear) and isinstance(model.down, SpQRLinear)
    x = torch.randn(4, 512, device="cuda", dtype=torch.float16)
    y = model(x)
    h = _ref(p_up, x, model.up.bias).half().float()
    ref = _ref(p_down, h)
    assert (y.double().cpu() - ref).abs().max().item() <= 1e-2 * ref.abs().max().item()
    assert set(model.up.sections()) >= {"codes", "stats"}
