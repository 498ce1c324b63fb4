"""What a call on the kernels costs the host (issue 12), counted, not timed:

- one launch per forward: the program that stores its partials last runs the
  second stage of the reduction in the same launch (kernels/_shared.py,
  ``take_ticket`` and ``finish_rows``), instead of a second kernel;
- a repeated call derives no launch plan again (tile splits, the second
  stage's blocks, the gradient scaling's plan come from caches).
"""

import pytest
import reference as ref
import torch
import triton
import triton.language as tl
from fastvae.kernels import _shared

import fastvae


@pytest.fixture
def launches(monkeypatch):
    """The names of the Triton kernels launched, in order, while the test runs
    (every launch: compiled or interpreted, from any module)."""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    seen = []
    for cls in (InterpretedFunction, JITFunction):
        def counted(self, *args, _run=cls.run, **kwargs):
            seen.append(self.fn.__name__)
            return _run(self, *args, **kwargs)
        monkeypatch.setattr(cls, "run", counted)
    return seen


@pytest.fixture
def forced_programs(split):
    """Tiles of at most 4 columns x 1 row x 1 iteration: many programs per launch."""
    with split(4, 1, 1):
        yield


def _inputs(device, batch=3, cols=10, latent=6):
    g = torch.Generator().manual_seed(0)
    x_hat = torch.rand(batch, cols, generator=g).to(device).requires_grad_()
    x = torch.rand(batch, cols, generator=g).to(device)
    mu = torch.randn(batch, latent, generator=g).to(device).requires_grad_()
    logvar = (torch.randn(batch, latent, generator=g) * 0.5).to(device).requires_grad_()
    return x_hat, x, mu, logvar


@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_loss_forward_is_one_launch_and_backward_one_more(backends, device, launches,
                                                          forced_programs, reduction):
    x_hat, x, mu, logvar = _inputs(device)
    loss = backends.kernels(fastvae.vae_loss, x_hat, x, mu, logvar, reduction=reduction,
                            beta=torch.tensor(0.5, device=device))
    assert launches == ["_vae_loss_partials_kernel"]
    loss.sum().backward()
    assert launches == ["_vae_loss_partials_kernel", "_scale_gradients_kernel"]
    # and both stages ran: the values and gradients of the formula (float64 oracle)
    x_hat64, x64, mu64, lv64 = (t.detach().double().requires_grad_() for t in (x_hat, x, mu, logvar))
    expected, _, _ = ref.vae_loss(x_hat64, x64, mu64, lv64, "mse", 0.5, reduction)
    expected.sum().backward()
    torch.testing.assert_close(loss.detach().double(), expected.detach(), rtol=1e-5, atol=1e-6)
    for got, want in ((x_hat, x_hat64), (mu, mu64), (logvar, lv64)):
        torch.testing.assert_close(got.grad.double(), want.grad, rtol=1e-5, atol=1e-6)


def test_kl_and_sampling_forwards_are_one_launch_each(backends, device, launches,
                                                      forced_programs):
    _, _, mu, logvar = _inputs(device)
    kl = backends.kernels(fastvae.kl_divergence, mu, logvar, reduction="batchmean")
    assert launches == ["_vae_loss_partials_kernel"]
    z, kl_rows = backends.kernels(fastvae.sample_and_kl, mu, logvar,
                                  generator=torch.Generator().manual_seed(1))
    assert launches == ["_vae_loss_partials_kernel", "_reparameterize_kernel"]
    expected_rows = ref.per_sample(ref.kl_elementwise(mu.detach(), logvar.detach()))
    torch.testing.assert_close(kl_rows.double(), expected_rows, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(kl.double(), expected_rows.sum() / mu.shape[0],
                               rtol=1e-5, atol=1e-6)


def test_free_bits_add_only_their_pre_pass(backends, device, launches, forced_programs):
    _, _, mu, logvar = _inputs(device)
    backends.kernels(fastvae.kl_divergence, mu, logvar, free_bits=0.1)
    assert launches == ["_kl_column_sums_kernel", "_vae_loss_partials_kernel"]


@triton.jit
def _tickets_kernel(
    counter_ptr,  # int32 (), zeroed: the counter take_ticket draws from
    tickets_ptr,  # int32 (programs,), out: each program's ticket
    finisher_ptr,  # int32 (programs,), out: 1 in the program that drew the last ticket
):
    """Each program draws a ticket and records it, and whether it is the last."""
    pid = tl.program_id(0)
    ticket = _shared.take_ticket(counter_ptr)
    tl.store(tickets_ptr + pid, ticket)
    tl.store(finisher_ptr + pid, (ticket == tl.num_programs(0) - 1).to(tl.int32))


@pytest.mark.parametrize("programs", [1, 7])
def test_each_program_draws_a_different_ticket_and_one_finishes(device, programs):
    if device.type == "cpu" and not _shared.is_interpreted():
        pytest.skip("needs the interpreter on CPU")
    counter = _shared.new_ticket_counter(device)
    tickets = torch.full((programs,), -1, dtype=torch.int32, device=device)
    finisher = torch.full((programs,), -1, dtype=torch.int32, device=device)
    with _shared.device_guard(counter):
        _tickets_kernel[(programs,)](counter, tickets, finisher)
    assert sorted(tickets.tolist()) == list(range(programs))
    assert finisher.sum().item() == 1
    assert counter.item() == programs


def _plan_cache_misses():
    from fastvae.kernels import scale_gradients

    return {f.__name__: f.cache_info().misses
            for f in (_shared._heuristic_split, _shared.finish_blocks, scale_gradients._plan)}


@pytest.mark.parametrize("free_bits", [0.0, 0.1])
def test_a_repeated_call_derives_no_launch_plan(backends, device, free_bits):
    def every_call(batch):
        x_hat, x, mu, logvar = _inputs(device, batch=batch)
        loss = fastvae.vae_loss(x_hat, x, mu, logvar, free_bits=free_bits)
        z, kl_rows = fastvae.sample_and_kl(mu, logvar)
        (loss + z.sum() + kl_rows.sum()).backward()

    from fastvae.kernels import scale_gradients

    for cached in (_shared._heuristic_split, _shared.finish_blocks, scale_gradients._plan):
        cached.cache_clear()  # (other tests may have derived these shapes' plans already)
    backends.kernels(every_call, 3)  # first use of these shapes: plans derived here
    before = _plan_cache_misses()
    backends.kernels(every_call, 3)
    assert _plan_cache_misses() == before
    backends.kernels(every_call, 5)  # new shapes do derive (the check can fail)
    assert _plan_cache_misses() != before
