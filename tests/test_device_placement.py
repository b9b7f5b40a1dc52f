"""Every module keeps its tensors on the device it is moved to (checked on every machine).

No GPU is lent to most runs of this suite, so ``test_cuda.py`` usually skips, and a module that
builds a constant on the CPU inside ``forward`` (or keeps one as a plain attribute that
``Module.to`` does not move) would fail only on a CUDA or MPS machine. Here each module is moved
to PyTorch's ``meta`` device, which runs no arithmetic, and every torch call it makes is checked
for tensors on two devices. The check is ours, not meta's: meta refuses a CPU operand in
elementwise arithmetic but lets ``einsum`` and ``matmul`` through, which CUDA would refuse.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from marrowseg.analyzers import get_analyzer
from marrowseg.config import load_config
from marrowseg.engine import planar
from marrowseg.synth import make_phantom


def _field(stain: str, side: int = 384) -> np.ndarray:
    """A phantom field at 0.5 µm/px: real stain levels, so each analyzer's per-slide step takes its full path."""
    rgb = make_phantom(stain, seed=5, size_px=(1024, 1024), mpp=0.5).render(0, 0, 1024, 1024)
    return np.ascontiguousarray(rgb[:side, :side, :3])


class _OneDevice(TorchFunctionMode):
    """Raise when a torch call gets tensors on two devices (a CPU 0-d scalar may join any, as on CUDA)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        leaves, _ = tree_flatten((args, kwargs))
        devices = {t.device for t in leaves
                   if isinstance(t, torch.Tensor) and not (t.device.type == "cpu" and t.dim() == 0)}
        if len(devices) > 1:
            raise RuntimeError(f"{getattr(func, '__name__', func)} mixes devices {sorted(map(str, devices))}")
        return func(*args, **kwargs)


def _on_meta(module: torch.nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    module, x = module.to("meta"), x.to("meta")  # the move itself copies across devices
    with torch.inference_mode(), _OneDevice():
        return module(x)


@pytest.mark.parametrize("stain", ["he", "ecad", "reticulin"])
def test_each_module_runs_whole_on_the_device_it_is_moved_to(stain):
    analyzer = get_analyzer(stain, load_config(stain))
    rgb = _field(stain)
    info = analyzer.prepare(rgb)
    if stain == "he":
        # the phantom's stain is mapped onto the reference one: the tissue classes then carry a
        # second deconvolution matrix, the piece most likely to be left behind on the CPU
        assert info["stain_vectors"] == "reference"
    x = planar(torch.from_numpy(rgb)[None])
    with torch.inference_mode():
        cpu = analyzer.module.eval()(x)
    meta = _on_meta(analyzer.module, x)
    assert meta.keys() == cpu.keys()
    for key, value in meta.items():
        assert value.device.type == "meta", key
        assert value.shape == cpu[key].shape, key


def test_the_learned_mask_module_runs_whole_on_the_device_it_is_moved_to():
    cfg = load_config("he", overrides=["he.nuclei.mask_net=true"])
    analyzer = get_analyzer("he", cfg)
    analyzer.prepare(_field("he"))
    x = planar(torch.from_numpy(_field("he", 256))[None])
    meta = _on_meta(analyzer.module, x)
    assert "mask" in meta and all(v.device.type == "meta" for v in meta.values())


@pytest.mark.parametrize("op", ["einsum", "matmul", "multiply"])
def test_a_constant_left_on_the_cpu_is_caught(op):
    """The check itself: a matrix kept as a plain attribute (``Module.to`` leaves it behind) is caught."""

    class Leaky(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.m = torch.eye(3)  # not a buffer

        def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
            if op == "einsum":
                return {"y": torch.einsum("bchw,cs->bshw", x, self.m)}
            if op == "matmul":
                return {"y": (x.permute(0, 2, 3, 1) @ self.m).permute(0, 3, 1, 2)}
            return {"y": x * self.m[0].view(1, 3, 1, 1)}

    x = torch.zeros(1, 3, 8, 8)
    assert Leaky()(x)["y"].shape == x.shape  # fine on the CPU
    with pytest.raises(RuntimeError, match="devices"):
        _on_meta(Leaky(), x)
