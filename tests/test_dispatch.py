"""The one place that decides which implementation runs."""

import pytest
import torch

from fastvae import _dispatch, _torch_impl


def test_cpu_defaults_to_the_pytorch_path(monkeypatch):
    monkeypatch.delenv("FASTVAE_BACKEND", raising=False)
    t = torch.zeros(2, 3)
    assert _dispatch.backend_for(t) == "torch"
    assert _dispatch.implementation(t) is _torch_impl


def test_forced_backends(monkeypatch):
    t = torch.zeros(2, 3)
    monkeypatch.setenv("FASTVAE_BACKEND", "torch")
    assert _dispatch.backend_for(t) == "torch"
    monkeypatch.setenv("FASTVAE_BACKEND", "TRITON")
    monkeypatch.setattr(_dispatch, "triton_available", lambda: True)
    assert _dispatch.backend_for(t) == "triton"
    # float64 always takes the PyTorch path
    assert _dispatch.backend_for(t.double()) == "torch"
    # forcing triton where it is not installed is an error, not a silent fallback
    monkeypatch.setattr(_dispatch, "triton_available", lambda: False)
    with pytest.raises(RuntimeError, match="FASTVAE_BACKEND=triton but triton is not installed"):
        _dispatch.backend_for(t)


def test_bad_backend_name(monkeypatch):
    monkeypatch.setenv("FASTVAE_BACKEND", "cuda")
    with pytest.raises(ValueError, match="FASTVAE_BACKEND must be 'torch' or 'triton', got 'cuda'"):
        _dispatch.backend_for(torch.zeros(1))


def test_backend_for_each_decides_per_tensor(monkeypatch):
    monkeypatch.setenv("FASTVAE_BACKEND", "triton")
    tensors = [torch.zeros(2), torch.zeros(2, dtype=torch.float64), torch.zeros(2, dtype=torch.bfloat16)]
    # float64 always takes the PyTorch path; the rest follow FASTVAE_BACKEND
    assert _dispatch.backend_for_each(tensors) == ["triton", "torch", "triton"]
