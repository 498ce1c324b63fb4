"""The backward runs on the backend its forward ran on.

FASTVAE_BACKEND is read when an op runs forward and kept with the graph: the
backward neither re-reads it (it may have changed) nor sends meta tensors to
the kernels. Small sizes: the kernels run under Triton's interpreter here.
"""

import pytest
import torch
from backends import INTERPRETED, NEEDS_INTERPRETER

import fastvae
from fastvae import _dispatch, _torch_impl, ops


def latents(seed=0, shape=(2, 3)):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g).requires_grad_(),
            torch.randn(shape, generator=g).requires_grad_())


@pytest.fixture
def kernels_module():
    from fastvae import kernels

    if not kernels.AVAILABLE:
        pytest.skip("triton is not installed")
    return kernels


@pytest.fixture
def kernels(kernels_module):
    """The kernels, for tests that run them on CPU tensors (only under the interpreter)."""
    if not INTERPRETED:
        pytest.skip(NEEDS_INTERPRETER.kwargs["reason"])
    return kernels_module


def test_meta_tensors_with_the_triton_backend_run_the_backward(monkeypatch, kernels_module):
    fastvae.set_backend("triton")
    x_hat = torch.empty(3, 4, device="meta", requires_grad=True)
    x = torch.empty(3, 4, device="meta")
    mu, logvar = (torch.empty(3, 2, device="meta", requires_grad=True) for _ in range(2))
    fastvae.vae_loss(x_hat, x, mu, logvar, reduction="none").sum().backward()
    fastvae.kl_divergence(mu, logvar).backward()
    z, kl = fastvae.sample_and_kl(mu, logvar)
    (z.sum() + kl.sum()).backward()
    for t in (x_hat, mu, logvar):
        assert t.grad.device.type == "meta" and t.grad.shape == t.shape


@pytest.mark.parametrize("forward_backend,backward_env", [("triton", "torch"), ("torch", "triton")])
def test_reparameterize_backward_regenerates_the_forwards_noise(monkeypatch, kernels,
                                                                forward_backend, backward_env):
    """The noise is the forward backend's (Philox in the kernels, the CPU generator on
    the PyTorch path): a backward on the other backend would differentiate other noise."""
    mu, logvar = latents()
    weights = torch.randn(mu.shape, generator=torch.Generator().manual_seed(1))
    fastvae.set_backend(forward_backend)
    z = fastvae.reparameterize(mu, logvar, generator=torch.Generator().manual_seed(7))
    zeros = torch.zeros_like(mu)
    eps = fastvae.reparameterize(zeros, zeros, generator=torch.Generator().manual_seed(7))
    fastvae.set_backend(backward_env)
    (z * weights).sum().backward()
    # z = mu + exp(lv / 2) eps: dz/dmu = 1, dz/dlv = exp(lv / 2) eps / 2
    torch.testing.assert_close(mu.grad, weights)
    torch.testing.assert_close(logvar.grad, 0.5 * torch.exp(0.5 * logvar.detach()) * eps * weights)


def test_the_backends_draw_different_noise(monkeypatch, kernels):
    """What makes the test above able to fail."""
    zeros = torch.zeros(2, 3)
    draws = []
    for backend in ("torch", "triton"):
        fastvae.set_backend(backend)
        draws.append(fastvae.reparameterize(zeros, zeros, generator=torch.Generator().manual_seed(7)))
    assert not torch.allclose(*draws)


def _spy_on_kernel_scaling(monkeypatch, kernels):
    calls = []
    original = kernels.scale_gradients_

    def spy(pairs):
        calls.append(len(pairs))
        return original(pairs)

    monkeypatch.setattr(kernels, "scale_gradients_", spy)
    return calls


@pytest.mark.parametrize("forward_backend,backward_env", [("triton", "torch"), ("torch", "triton")])
def test_loss_and_kl_gradients_are_scaled_by_the_forwards_backend(monkeypatch, kernels,
                                                                  forward_backend, backward_env):
    calls = _spy_on_kernel_scaling(monkeypatch, kernels)
    mu, logvar = latents()
    x_hat = torch.randn(2, 5, requires_grad=True)
    x = torch.rand(2, 5)
    fastvae.set_backend(forward_backend)
    loss = fastvae.vae_loss(x_hat, x, mu, logvar, reduction="none")
    kl = fastvae.kl_divergence(mu, logvar, reduction="none")
    fastvae.set_backend(backward_env)
    w = torch.tensor([2.0, -0.5])
    (loss * w).sum().backward()
    assert bool(calls) == (forward_backend == "triton")
    torch.testing.assert_close(x_hat.grad, 2 * (x_hat.detach() - x) * w[:, None])
    mu.grad = logvar.grad = None
    calls.clear()
    (kl * w).sum().backward()
    assert bool(calls) == (forward_backend == "triton")
    torch.testing.assert_close(mu.grad, mu.detach() * w[:, None])
    torch.testing.assert_close(logvar.grad, 0.5 * torch.expm1(logvar.detach()) * w[:, None])


def test_reparameterize_backward_op_takes_the_forwards_backend(kernels):
    mu, logvar = (t.detach() for t in latents())
    seed = torch.tensor([123])
    grad_z = torch.ones_like(mu)
    outputs = {}
    for backend in ("torch", "triton"):
        z, _ = _dispatch.implementation_named(backend).reparameterize_forward(
            mu, logvar, seed, None, None, False)
        _, grad_logvar, _, _ = ops.reparameterize_backward_op(grad_z, None, mu, logvar, None, None,
                                                              seed, None, None, 0, backend)
        # dz/dlv = (z - mu) / 2 with the forward's own z
        torch.testing.assert_close(grad_logvar, 0.5 * (z - mu))
        outputs[backend] = grad_logvar
    assert not torch.allclose(outputs["torch"], outputs["triton"])
    assert _dispatch.implementation_named("torch") is _torch_impl
    assert _dispatch.implementation_named("triton") is kernels


def test_torch_func_on_the_kernels_backend_uses_the_kernels_noise(monkeypatch, kernels):
    """Under a transform the ops run as torch formulas; the noise still comes from the
    backend the eager call would use (here the kernels' Philox noise)."""
    from torch.func import grad, jvp

    fastvae.set_backend("triton")
    mu, logvar = (t.detach() for t in latents())
    eager = fastvae.reparameterize(mu, logvar, generator=torch.Generator().manual_seed(5))
    z, dz = jvp(lambda lv: fastvae.reparameterize(mu, lv, generator=torch.Generator().manual_seed(5)),
                (logvar,), (torch.ones_like(logvar),))
    torch.testing.assert_close(z, eager)
    eps = (eager - mu) / torch.exp(0.5 * logvar)
    torch.testing.assert_close(dz, 0.5 * torch.exp(0.5 * logvar) * eps)
    torch.testing.assert_close(
        grad(lambda m: fastvae.kl_divergence(m, logvar))(mu), mu)


def _sample_and_loss(mu, logvar):
    z, kl = fastvae.sample_and_kl(mu, logvar, num_samples=2)
    return z, z.square().mean() + kl.sum()


def _assert_gradients_of_the_drawn_noise(z, loss, mu, logvar):
    grad_mu, grad_logvar = torch.autograd.grad(loss, (mu, logvar))
    z, mu, logvar = z.detach(), mu.detach(), logvar.detach()
    # loss = mean_k (z_k^2) + sum KL, z_k = mu + exp(lv / 2) eps_k: from the z the call drew
    dz = 2 * z / z.numel()
    torch.testing.assert_close(grad_mu, dz.sum(0) + mu)
    torch.testing.assert_close(grad_logvar, (dz * (z - mu) / 2).sum(0) + 0.5 * torch.expm1(logvar))


def _traced(kind):
    from functorch.compile import aot_function, nop

    torch._dynamo.reset()
    if kind == "aot_function":
        return aot_function(_sample_and_loss, fw_compiler=nop, bw_compiler=nop)
    return torch.compile(_sample_and_loss, backend="aot_eager", fullgraph=True)


@pytest.mark.parametrize("kind", ["aot_function", "compile"])
@pytest.mark.parametrize("traced_on,run_on", [("torch", "triton"), ("triton", "torch")])
def test_a_traced_graph_keeps_one_backend_for_its_forward_and_backward(kernels, kind, traced_on,
                                                                        run_on):
    """A traced graph holds the backend it was traced for, for its forward op and its
    backward alike: run later under another setting (aot_function reuses its trace; a
    torch.compile graph loaded from the on-disk cache that a run on the other backend
    filled did too), it still differentiates the noise its forward drew. (Before, the
    backward kept the trace-time backend while the forward picked one when run: the
    other backend's noise, wrong gradients.)"""
    mu, logvar = latents(shape=(4, 6))
    traced = _traced(kind)
    fastvae.set_backend(traced_on)
    traced(mu, logvar)
    fastvae.set_backend(run_on)
    _assert_gradients_of_the_drawn_noise(*traced(mu, logvar), mu, logvar)


@pytest.mark.parametrize("kind", ["aot_function", "compile"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_a_traced_graphs_backward_outside_the_use_backend_block_or_thread(kernels, kind, backend):
    """The forward runs in a use_backend block (thread-local), its backward after the block
    ends, and in another thread (autograd runs a CUDA graph's backward in its device
    thread, where the block is not in force): the noise of the forward's backend both times."""
    import threading

    other = "torch" if backend == "triton" else "triton"
    fastvae.set_backend(other)
    mu, logvar = latents(shape=(4, 6))
    traced = _traced(kind)
    with fastvae.use_backend(backend):
        z, loss = traced(mu, logvar)
    _assert_gradients_of_the_drawn_noise(z, loss, mu, logvar)
    with fastvae.use_backend(backend):
        z, loss = traced(mu, logvar)
        errors = []

        def backward():
            try:
                _assert_gradients_of_the_drawn_noise(z, loss, mu, logvar)
            except BaseException as e:  # noqa: BLE001 - reported in the test's thread
                errors.append(e)

        thread = threading.Thread(target=backward)
        thread.start()
        thread.join()
    if errors:
        raise errors[0]
