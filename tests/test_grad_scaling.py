"""fastvae._grad_scaling: the private torch APIs the in-place scaling relies on
are present (a torch upgrade that removes one fails here, loudly, instead of
silently turning the optimisation off), and the one predicate answers right."""

import pytest
import torch

import fastvae
from fastvae import _grad_scaling, _torch_impl


@pytest.mark.parametrize("name", sorted(_grad_scaling.PRIVATE_APIS))
def test_private_torch_api_is_present(name):
    assert _grad_scaling.PRIVATE_APIS[name] is not None, (
        f"{name} is gone from this torch: the in-place gradient scaling is off; "
        f"find its replacement")


def test_storage_use_count_counts_views():
    g = torch.zeros(4)
    alone = _grad_scaling._only_holder(g)
    view = g[1:]
    shared = _grad_scaling._only_holder(g)
    del view
    assert alone and not shared and _grad_scaling._only_holder(g)


def test_saved_tensor_hooks_are_seen():
    assert not _grad_scaling.saved_tensor_hooks_active()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
        assert _grad_scaling.saved_tensor_hooks_active()


def _scaled_in_place(retain_graph, hooks=False):
    """Runs a loss backward and reports whether the x_hat gradient buffer was the
    op's own saved buffer (scaled in place) or a new tensor."""
    # more than SMALL_NUMEL elements: smaller losses compute their gradients in the
    # backward (nothing saved to scale)
    cols = _torch_impl.SMALL_NUMEL // 3 + 1
    x_hat = torch.randn(3, cols, requires_grad=True)
    x, mu, lv = torch.randn(3, cols), torch.randn(3, 2), torch.randn(3, 2)
    seen = []
    original = _grad_scaling.scale_gradients

    def spy(ctx, pairs):
        out = original(ctx, pairs)
        seen.append([p is not None and o is p[0] for p, o in zip(pairs, out)])
        return out

    _grad_scaling_ops = __import__("fastvae.ops", fromlist=["scale_gradients"])
    _grad_scaling_ops.scale_gradients = spy
    try:
        if hooks:
            with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
                loss = fastvae.vae_loss(x_hat, x, mu, lv)
        else:
            loss = fastvae.vae_loss(x_hat, x, mu, lv)
        loss.backward(torch.tensor(2.0), retain_graph=retain_graph)
    finally:
        _grad_scaling_ops.scale_gradients = original
    torch.testing.assert_close(x_hat.grad, 2.0 * 2.0 * (x_hat.detach() - x))
    return seen[0][0]


def test_in_place_only_on_the_last_use_without_hooks():
    assert _scaled_in_place(retain_graph=False)
    assert not _scaled_in_place(retain_graph=True)
    assert not _scaled_in_place(retain_graph=False, hooks=True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("weights", ["ones", "powers_of_two", "thirds", "random"])
@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
def test_half_buffers_scaled_per_sample_round_once(dtype, weights, layout):
    """A half-precision buffer times float32 per-sample weights: the float32 product
    rounded once to the buffer's dtype, whichever way it is computed (the weights
    converted when exact, blocks of rows in float32, or the mixed-dtype op)."""
    gen = torch.Generator().manual_seed(1)
    rows, cols = 37, 9000  # several row blocks
    g = torch.randn(rows, cols, generator=gen).to(dtype)
    if layout == "transposed":
        g = g.t().contiguous().t()
    w = {"ones": torch.ones(rows),
         "powers_of_two": 2.0 ** torch.randint(-6, 6, (rows,), generator=gen).float(),
         "thirds": torch.full((rows,), 1.0 / 3.0),
         "random": torch.rand(rows, generator=gen) + 0.25}[weights]
    want = (g.float() * w[:, None]).to(dtype)
    got = _grad_scaling._scale_in_place(g.clone(), w)
    assert got.dtype == dtype
    assert torch.equal(got, want)


def test_half_precision_loss_gradients_per_sample_are_the_float32_products():
    """reduction="none" on bfloat16 inputs: the gradient for unit weights is 2 (x_hat - x)
    rounded once to bfloat16 (the buffer the forward writes); weighted per sample, it is
    that buffer times the weight in float32, rounded once more."""
    gen = torch.Generator().manual_seed(2)
    x_hat = torch.randn(6, 50000, generator=gen).bfloat16().requires_grad_()  # past SMALL_NUMEL
    x = torch.randn(6, 50000, generator=gen).bfloat16()
    mu, logvar = (torch.randn(6, 4, generator=gen).requires_grad_() for _ in range(2))
    w = torch.rand(6, generator=gen) + 0.5
    loss = fastvae.vae_loss(x_hat, x, mu, logvar, reduction="none")
    (g_weighted,) = torch.autograd.grad(loss, x_hat, w, retain_graph=True)
    (g_unit,) = torch.autograd.grad(loss, x_hat, torch.ones(6))
    assert torch.equal(g_unit, (2 * (x_hat.detach().float() - x.float())).bfloat16())
    assert torch.equal(g_weighted, (g_unit.float() * w[:, None]).bfloat16())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("call", ["vae_loss", "kl_divergence"])
def test_half_precision_per_sample_gradients_compile_in_one_graph(dtype, call):
    """reduction="none" on half-precision inputs under torch.compile(fullgraph=True):
    the backward's per-sample scaling of a half-precision buffer is traced (its shortcut
    for weights that are exactly half-precision numbers read them with torch.equal, a
    data-dependent call that failed AOTAutograd's trace of the backward), and gives the
    eager gradients (to the dtype's rounding: small eager calls compute theirs in the
    backward, rounding once where the traced op's forward-computed buffer is rounded,
    then scaled and rounded again)."""
    gen = torch.Generator().manual_seed(3)
    x_hat, x = (torch.randn(5, 7, generator=gen).to(dtype) for _ in range(2))
    mu, logvar = (torch.randn(5, 3, generator=gen).to(dtype) for _ in range(2))
    w = torch.rand(5, generator=gen) + 0.5  # per-sample weights, not half-precision numbers

    def per_sample(x_hat, mu, logvar):
        if call == "vae_loss":
            return fastvae.vae_loss(x_hat, x, mu, logvar, reduction="none")
        return fastvae.kl_divergence(mu, logvar, reduction="none")

    compiled = torch.compile(per_sample, fullgraph=True, backend="aot_eager")
    results = []
    for fn in (per_sample, compiled):
        leaves = [t.clone().requires_grad_() for t in (x_hat, mu, logvar)]
        out = fn(*leaves)
        wrt = leaves if call == "vae_loss" else leaves[1:]
        results.append((out, *torch.autograd.grad(out, wrt, w)))
    for got, want in zip(results[1], results[0]):
        assert got.dtype == want.dtype
        torch.testing.assert_close(got, want)
