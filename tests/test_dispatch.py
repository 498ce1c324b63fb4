"""The one place that decides which implementation runs."""

import os
import subprocess
import sys

import pytest
import torch

import fastvae
from fastvae import _dispatch, _torch_impl


@pytest.fixture
def environment_unread(monkeypatch):
    """As in a fresh process: FASTVAE_BACKEND not read yet (restored after the test)."""
    monkeypatch.setattr(_dispatch, "_forced", _dispatch._NOT_READ)


def test_cpu_defaults_to_the_pytorch_path(monkeypatch, environment_unread):
    monkeypatch.delenv("FASTVAE_BACKEND", raising=False)
    t = torch.zeros(2, 3)
    assert _dispatch.backend_for(t) == "torch"
    assert _dispatch.implementation(t) is _torch_impl


def test_forced_backends(monkeypatch):
    t = torch.zeros(2, 3)
    fastvae.set_backend("torch")
    assert _dispatch.backend_for(t) == "torch"
    monkeypatch.setattr(_dispatch, "triton_available", lambda: True)
    fastvae.set_backend("TRITON")
    assert _dispatch.backend_for(t) == "triton"
    # float64 always takes the PyTorch path
    assert _dispatch.backend_for(t.double()) == "torch"
    # forcing triton where it is not installed is an error, not a silent fallback
    monkeypatch.setattr(_dispatch, "triton_available", lambda: False)
    with pytest.raises(RuntimeError, match="triton is not installed"):
        _dispatch.backend_for(t)
    fastvae.set_backend("auto")
    assert _dispatch.forced_backend() is None and _dispatch.backend_for(t) == "torch"


def test_environment_is_read_once_on_first_use(monkeypatch, environment_unread):
    monkeypatch.setenv("FASTVAE_BACKEND", " Torch ")
    assert _dispatch.forced_backend() == "torch"
    monkeypatch.setenv("FASTVAE_BACKEND", "nonsense")  # too late: already read
    assert _dispatch.forced_backend() == "torch"
    assert _dispatch.backend_for(torch.zeros(1)) == "torch"


def test_a_fresh_process_honours_the_environment():
    """What the Makefile's FASTVAE_BACKEND=triton run relies on."""
    code = ("import torch, fastvae; from fastvae import _dispatch; "
            "print(_dispatch.backend_for(torch.zeros(1)), fastvae.set_backend(None))")
    env = dict(os.environ, FASTVAE_BACKEND="torch")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=120, check=True)
    assert out.stdout.split() == ["torch", "torch"]


def test_bad_backend_name_in_the_environment(monkeypatch, environment_unread):
    monkeypatch.setenv("FASTVAE_BACKEND", "cuda")
    with pytest.raises(ValueError, match="FASTVAE_BACKEND must be 'torch' or 'triton', got 'cuda'"):
        _dispatch.backend_for(torch.zeros(1))
    with pytest.raises(ValueError, match="FASTVAE_BACKEND must be 'torch' or 'triton', got 'cuda'"):
        fastvae.kl_divergence(torch.zeros(2, 2), torch.zeros(2, 2))


def test_set_backend_checks_its_argument_and_returns_the_previous_setting():
    with pytest.raises(ValueError, match="backend must be 'torch' or 'triton', got 'cuda'"):
        fastvae.set_backend("cuda")
    with pytest.raises(TypeError, match="backend must be 'torch', 'triton' or None, got int"):
        fastvae.set_backend(1)
    fastvae.set_backend(None)
    assert fastvae.set_backend("torch") is None
    assert fastvae.set_backend(None) == "torch"


def test_use_backend_restores_the_setting_even_on_error():
    fastvae.set_backend(None)
    with pytest.raises(RuntimeError, match="inside"):
        with fastvae.use_backend("torch"):
            assert _dispatch.forced_backend() == "torch"
            raise RuntimeError("inside")
    assert _dispatch.forced_backend() is None


def test_use_backend_blocks_in_two_threads_neither_see_nor_undo_each_other():
    """Thread A enters a torch block, thread B a triton block, A leaves, then B: each thread
    saw its own choice throughout, and the process setting is what it was before."""
    import threading

    fastvae.set_backend(None)
    a_in, b_in, a_out = threading.Event(), threading.Event(), threading.Event()
    seen = {}

    def thread_a():
        with fastvae.use_backend("torch"):
            a_in.set()
            b_in.wait(5)
            seen["a"] = _dispatch.forced_backend()
        a_out.set()

    def thread_b():
        a_in.wait(5)
        with fastvae.use_backend("triton"):
            b_in.set()
            a_out.wait(5)
            seen["b"] = _dispatch.forced_backend()
        seen["b_after"] = _dispatch.forced_backend()

    threads = [threading.Thread(target=thread_a), threading.Thread(target=thread_b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert seen == {"a": "torch", "b": "triton", "b_after": None}
    assert _dispatch.forced_backend() is None


def test_use_backend_nests_and_set_backend_inside_a_block_applies_after_it():
    fastvae.set_backend(None)
    with fastvae.use_backend("torch"):
        with fastvae.use_backend(None):  # automatic inside a forced block
            assert _dispatch.forced_backend() is None
        assert _dispatch.forced_backend() == "torch"
        assert fastvae.set_backend("triton") is None  # the process setting it replaces
        assert _dispatch.forced_backend() == "torch"  # the block still holds in this thread
    assert _dispatch.forced_backend() == "triton"
    fastvae.set_backend(None)


def test_set_backend_overrides_the_environment(monkeypatch, environment_unread):
    monkeypatch.setenv("FASTVAE_BACKEND", "triton")
    assert fastvae.set_backend("torch") == "triton"  # the previous setting: the environment's
    assert _dispatch.backend_for(torch.zeros(1)) == "torch"


def test_a_bad_environment_fails_set_backend_too(monkeypatch, environment_unread):
    # set_backend returns the previous setting, which is FASTVAE_BACKEND's
    monkeypatch.setenv("FASTVAE_BACKEND", "cuda")
    with pytest.raises(ValueError, match="FASTVAE_BACKEND must be 'torch' or 'triton', got 'cuda'"):
        fastvae.set_backend("torch")


def test_set_backend_is_exported():
    assert fastvae.set_backend is _dispatch.set_backend
    assert fastvae.use_backend is _dispatch.use_backend
    assert {"set_backend", "use_backend"} <= set(fastvae.__all__)


def test_traced_backend_is_a_constant_to_torch_compile():
    """traced_backend carries torch.compiler.assume_constant_result's mark (set without
    importing torch._dynamo): the decorator still marks a function that way."""
    def probe():
        return None

    marked = torch.compiler.assume_constant_result(probe)
    marks = {name for name in vars(marked) if name.startswith("_dynamo")}
    assert marks == {"_dynamo_marked_constant"}
    assert getattr(_dispatch.traced_backend, "_dynamo_marked_constant", False) is True
