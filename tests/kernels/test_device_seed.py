"""Seeds that survive CUDA graphs (issue 13): the reparameterization kernels read
their seed from memory, a 1-element int64 tensor that ``_draw_seed`` draws on
the data's GPU with a graph-safe PyTorch call (a host seed stays on the CPU).

What runs here: the kernels under the interpreter with the seed read from
memory (rewriting the seed tensor in place, as a graph replay's captured draw
does, changes the next launch's noise; nothing reads it on the host), the
choice of where ``_draw_seed`` draws, the CPU path's exact reproducibility, and
torch.compile with the seed as a tensor. The CUDA graph replays themselves run
in ``benchmarks/gpu_check.py``.
"""

import types

import pytest
import torch
from fastvae.kernels import reparameterize as reparameterize_kernels

import fastvae
from fastvae import _torch_impl, functional, kernels, ops


def latents(device, shape=(4, 3, 5), seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).to(device), torch.randn(shape, generator=g).to(device)


def seed_tensor(value, device):
    return torch.tensor([value], dtype=torch.int64, device=device)


@pytest.fixture
def no_host_read_of(monkeypatch):
    """Make every host read of the given tensor's value (item, int, index, bool,
    tolist) raise: what a seed on the GPU must never need."""
    def forbid(tensor):
        for name in ("item", "__int__", "__index__", "__bool__", "__float__", "tolist"):
            real = getattr(torch.Tensor, name)

            def guarded(self, *args, real=real, name=name):
                if self.data_ptr() == tensor.data_ptr():
                    raise AssertionError(f"the seed was read on the host ({name})")
                return real(self, *args)
            monkeypatch.setattr(torch.Tensor, name, guarded)
    return forbid


def test_the_kernels_read_the_seed_from_memory(backends, device, no_host_read_of):
    mu, logvar = latents(device)
    grad_z = torch.randn_like(mu)
    seed = seed_tensor(7, device)
    no_host_read_of(seed)

    def forward():
        return kernels.reparameterize_forward(mu, logvar, seed, None, None, False)[0]

    z7 = backends.kernels(forward)
    seed.fill_(8)  # what a CUDA graph replay does: the captured draw rewrites the seed
    z8 = backends.kernels(forward)
    assert not torch.equal(z7, z8)
    fresh = kernels.reparameterize_forward(mu, logvar, seed_tensor(8, device), None, None, False)[0]
    assert torch.equal(z8, fresh)
    # the backward reads the same memory: it regenerates the eps of the seed it finds there
    seed.fill_(7)
    grad_mu, grad_logvar = backends.kernels(kernels.reparameterize_backward, grad_z, None, mu,
                                            logvar, seed, None, None)
    eps7 = (z7 - mu) / torch.exp(0.5 * logvar)
    torch.testing.assert_close(grad_logvar, 0.5 * grad_z * eps7 * torch.exp(0.5 * logvar))
    assert torch.equal(grad_mu, grad_z)


def test_the_kernel_launch_gets_the_seed_tensor_not_an_int(backends, device, monkeypatch):
    """The seed argument of both launches is the seed tensor's memory, on the data's device."""
    launched = []
    for name in ("_reparameterize_kernel", "_reparameterize_backward_kernel"):
        real = getattr(reparameterize_kernels, name)

        class Spy:
            def __getitem__(self, grid, real=real, name=name):
                def launch(*args, **kwargs):
                    launched.append((name, args))
                    return real[grid](*args, **kwargs)
                return launch
        monkeypatch.setattr(reparameterize_kernels, name, Spy())
    mu, logvar = latents(device)
    mu.requires_grad_()
    torch.manual_seed(0)  # the default generator: on a GPU the seed is drawn there
    z, kl = backends.kernels(fastvae.sample_and_kl, mu, logvar)
    (z.sum() + kl.sum()).backward()
    assert [name for name, _ in launched] == ["_reparameterize_kernel",
                                              "_reparameterize_backward_kernel"]
    forward_seed, backward_seed = launched[0][1][4], launched[1][1][6]
    for seed in (forward_seed, backward_seed):
        assert isinstance(seed, torch.Tensor) and seed.dtype == torch.int64
        assert seed.numel() == 1 and seed.device == mu.device
    assert forward_seed.data_ptr() == backward_seed.data_ptr()  # the saved seed itself


@pytest.mark.parametrize("bad", [7, torch.tensor([1, 2]), torch.tensor([1.0])])
def test_the_launcher_refuses_a_seed_that_is_not_one_int64_element(backends, device, bad):
    mu, logvar = latents(device)
    with pytest.raises(TypeError, match="seed must be a 1-element int64 tensor"):
        backends.kernels(kernels.reparameterize_forward, mu, logvar, bad, None, None, False)


def test_a_host_seed_reaches_the_kernels_too(backends, device):
    """A CPU generator with data elsewhere draws on the host; the launcher moves
    the seed (with CPU data under the interpreter it is already in place)."""
    mu, logvar = latents(device)
    host = seed_tensor(11, "cpu")
    z = backends.kernels(kernels.reparameterize_forward, mu, logvar, host, None, None, False)[0]
    same = backends.kernels(kernels.reparameterize_forward, mu, logvar, seed_tensor(11, device),
                            None, None, False)[0]
    assert torch.equal(z, same)


# ---- where _draw_seed draws -------------------------------------------------------


def test_cpu_seed_is_the_same_host_draw_as_before():
    """CPU tensors keep a host seed, the value the 0-dim draw gave before seeds
    became 1-element tensors: the PyTorch path's z is bitwise what it was."""
    mu, logvar = latents("cpu")
    seed = functional._draw_seed(torch.Generator().manual_seed(5), mu)
    assert seed.shape == (1,) and seed.dtype == torch.int64 and seed.device.type == "cpu"
    old = torch.randint(0, 2**62, (), generator=torch.Generator().manual_seed(5))
    assert seed.item() == old.item()
    torch.manual_seed(9)
    seed = functional._draw_seed(None, mu)
    torch.manual_seed(9)
    assert seed.item() == torch.randint(0, 2**62, ()).item()

    z = fastvae.reparameterize(mu, logvar, generator=torch.Generator().manual_seed(5))
    eps = _torch_impl.standard_normal(old.item(), mu.shape, torch.float32, "cpu")
    assert torch.equal(z, torch.addcmul(mu, eps, torch.mul(logvar, 0.5).exp_()))


def test_cuda_tensors_draw_their_seed_on_their_device(monkeypatch):
    """For CUDA data the seed comes from torch.randint on the data's device (the
    default CUDA generator, or the CUDA generator passed): one graph-safe call, no
    host read. Checked here with a stand-in for torch.randint (no GPU)."""
    calls = []

    def randint(low, high, size, generator=None, device=None):
        calls.append(dict(low=low, high=high, size=size, generator=generator,
                          device=None if device is None else torch.device(device)))
        return torch.zeros(1, dtype=torch.int64)

    monkeypatch.setattr(torch, "randint", randint)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    cuda_data = types.SimpleNamespace(device=torch.device("cuda", 1))
    functional._draw_seed(None, cuda_data)
    assert calls[-1] == dict(low=0, high=2**62, size=(1,), generator=None,
                             device=torch.device("cuda", 1))
    # a CPU generator with CUDA data: a host draw from that generator (the launcher copies it)
    cpu_gen = torch.Generator()
    functional._draw_seed(cpu_gen, cuda_data)
    assert calls[-1]["generator"] is cpu_gen and calls[-1]["device"] == torch.device("cpu")
    # CPU data: the host draw (on the CPU whatever torch's default device)
    functional._draw_seed(None, torch.zeros(2))
    assert calls[-1]["device"] == torch.device("cpu") and calls[-1]["size"] == (1,)


def test_a_cpu_generator_is_refused_inside_a_cuda_graph_capture(monkeypatch):
    """A host draw would run once, at capture, and every replay would reuse its noise:
    refused with a clear error (checked with a stand-in for the capture state)."""
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    cuda_data = types.SimpleNamespace(device=torch.device("cuda", 0))
    with pytest.raises(ValueError, match="generator: a CPU generator cannot seed sampling of "
                                         "CUDA tensors inside a CUDA graph capture"):
        functional._draw_seed(torch.Generator().manual_seed(0), cuda_data)
    # CPU data is not captured: its host draw stays allowed
    assert functional._draw_seed(torch.Generator().manual_seed(0), torch.zeros(2)).shape == (1,)


# ---- torch.compile with the seed as a tensor ----------------------------------------


def test_compiled_with_a_seed_tensor_one_graph_for_every_seed(backends, device):
    torch._dynamo.reset()
    mu, logvar = latents(device)
    mu.requires_grad_()
    grad_z = torch.randn_like(mu)

    def sample(mu, logvar, seed):
        z, kl = ops.reparameterize(mu, logvar, None, None, seed, -2.0, 2.0, True, 0)
        return z, kl

    compiled = torch.compile(sample, fullgraph=True, dynamic=False)
    before = torch._dynamo.utils.counters["stats"]["unique_graphs"]

    def run(fn, value):
        z, kl = fn(mu, logvar, seed_tensor(value, device))
        (grad_mu,) = torch.autograd.grad((z * grad_z).sum() + kl.sum(), mu)
        return z.detach(), kl.detach(), grad_mu

    z7, kl7, g7 = backends.kernels(run, compiled, 7)
    z8, _, _ = backends.kernels(run, compiled, 8)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] - before == 1  # seed is data
    assert not torch.equal(z7, z8)
    e7, ekl7, eg7 = backends.kernels(run, sample, 7)  # eager, same seed: the same numbers
    assert torch.equal(z7, e7) and torch.equal(kl7, ekl7)
    torch.testing.assert_close(g7, eg7)


def test_compiled_sampling_is_fresh_per_call_and_reproducible(backends, device):
    torch._dynamo.reset()
    mu, logvar = latents(device)
    compiled = torch.compile(lambda mu, logvar: fastvae.sample_and_kl(mu, logvar)[0],
                             fullgraph=True, dynamic=False)
    torch.manual_seed(3)
    a, b = backends.kernels(compiled, mu, logvar), backends.kernels(compiled, mu, logvar)
    torch.manual_seed(3)
    c = backends.kernels(compiled, mu, logvar)
    assert torch.equal(a, c) and not torch.equal(a, b)
    eps = ((a - mu) / torch.exp(0.5 * logvar)).flatten()
    assert eps.abs().max() < 6 and abs(eps.mean().item()) < 0.5
