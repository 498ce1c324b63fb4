"""The backward of the loss and KL ops: scaling the gradient buffers that the
forward computed by ``grad_output``, in place when that is safe.

The loss ops compute their gradients in the forward and save them; the backward
only multiplies each buffer by its weight (``grad_output``, times beta for the
KL, per sample for ``reduction="none"``). On a buffer's last use, when nothing
else can see it, it is scaled in place and handed on, so a loss fwd+bwd holds
one gradient-sized buffer per input instead of two (eager's fused mse/bce
kernels hold one). The buffers are the op's own outputs, never a user's input.

Whether a buffer may be written is decided by one predicate,
``may_scale_in_place``, from four facts that only private torch APIs expose.
Each is named below; if a torch release removes one, the predicate answers
"no" (the safe side: a new tensor is returned) and ``tests/test_grad_scaling.py``
fails loudly so that the lost optimisation is noticed.
"""

from collections.abc import Sequence

import torch
from torch import Tensor

# ---- the private torch APIs this relies on (each checked by a test) --------

# Number of references to a storage, by its C pointer: tells whether the
# saved buffer is the only tensor on its storage (the caller dropped the op's
# output and holds no view of it).
STORAGE_USE_COUNT = getattr(torch._C, "_storage_Use_Count", None)

# The innermost active torch.autograd.graph.saved_tensors_hooks pair, or None:
# a pack hook may keep the saved buffer itself, so never scale in place then.
TOP_SAVED_TENSORS_HOOKS = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)

# Whether the running backward keeps its graph (retain_graph=True): then the
# saved buffers are used again and must not change.
GRAPH_TASK_KEEPS_GRAPH = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)

try:  # whether a TorchDispatchMode (make_fx, FakeTensorMode, opcheck...) is active
    from torch.utils._python_dispatch import is_in_torch_dispatch_mode as _dispatch_mode_query
except ImportError:  # pragma: no cover - only on a torch that moved it
    _dispatch_mode_query = None

PRIVATE_APIS = {
    "torch._C._storage_Use_Count": STORAGE_USE_COUNT,
    "torch._C._autograd._top_saved_tensors_default_hooks": TOP_SAVED_TENSORS_HOOKS,
    "torch._C._autograd._get_current_graph_task_keep_graph": GRAPH_TASK_KEEPS_GRAPH,
    "torch.utils._python_dispatch.is_in_torch_dispatch_mode": _dispatch_mode_query,
}


def in_torch_dispatch_mode() -> bool:
    """True under a TorchDispatchMode; unknown (the API moved) counts as True,
    which sends every call to the custom ops (correct, only slower)."""
    return True if _dispatch_mode_query is None else bool(_dispatch_mode_query())


def saved_tensor_hooks_active() -> bool:
    """True while a saved_tensors_hooks pack hook is active (asked at setup time,
    when the op saves its buffers). Unknown counts as active."""
    return TOP_SAVED_TENSORS_HOOKS is None or TOP_SAVED_TENSORS_HOOKS(False) is not None


def _only_holder(g: Tensor) -> bool:
    """``g`` is the only tensor on its storage. Counted: ``g`` and the storage handle."""
    return STORAGE_USE_COUNT is not None and STORAGE_USE_COUNT(g.untyped_storage()._cdata) == 2


def _backward_frees_saved_buffers() -> bool:
    """This backward is the last use of the op's saved buffers and nothing else can
    see them through the graph: no retain_graph (the engine frees them right after
    this node), no create_graph, outside any tracing (torch.compile, make_fx, opcheck)."""
    return (GRAPH_TASK_KEEPS_GRAPH is not None and not GRAPH_TASK_KEEPS_GRAPH()
            and not torch.is_grad_enabled() and not torch.compiler.is_compiling()
            and not in_torch_dispatch_mode())


def _backward_may_write(ctx) -> bool:
    return not ctx.hooked and _backward_frees_saved_buffers()


def _unshared(g: Tensor) -> bool:
    return type(g) is torch.Tensor and _only_holder(g)


def may_scale_in_place(ctx, g: Tensor) -> bool:
    """The one rule: may the saved gradient buffer ``g`` be written in place now?
    Yes only when no saved-tensor hook saw it (``ctx.hooked``, from setup), this
    backward is its last use, it is a plain tensor, and nothing else shares its storage."""
    return _backward_may_write(ctx) and _unshared(g)


def per_sample_view(w: Tensor, like: Tensor) -> Tensor:
    """Reshape a (N,) grad_output of reduction="none" to broadcast over ``like``."""
    return w.reshape((-1,) + (1,) * (like.dim() - 1)) if w.dim() == 1 else w


# Rows of a half-precision buffer scaled per block in float32 when the weights are not
# exactly half-precision numbers: a block in cache, ~1 MiB of float32 at a time.
_SCALE_BLOCK_ELEMENTS = 1 << 18


def _scale_in_place(g: Tensor, w: Tensor) -> Tensor:
    """``g *= w`` with one rounding to g's dtype (w: 0-dim, or (N,) per sample).

    A half-precision ``g`` times a float32 (N, 1) ``w`` is a mixed-dtype op, which
    PyTorch's CPU kernels run element by element with dynamic casts (measured 3.1 ms
    at 512x12288 bfloat16, against 0.47 ms with both in bfloat16). Where every
    weight is exactly a number of g's dtype (1, 1/N for a power of two N, ...), the
    weights are converted: the kernel multiplies in float32 and rounds once, the
    same bits as float32 arithmetic (a product of two such numbers is exact in
    float32). Otherwise blocks of rows are scaled in float32 in cache. A 0-dim ``w``
    is read as a float32 scalar by the kernel already. Traced (torch.compile, make_fx),
    the mixed-dtype op itself: the shortcut's test reads the weights' values, which a
    trace cannot (and a compiled kernel fuses the conversion anyway)."""
    if not _mixed_per_sample(g, w) or torch.compiler.is_compiling() or in_torch_dispatch_mode():
        return g.mul_(per_sample_view(w, g))
    narrow = w.to(g.dtype)
    if torch.equal(narrow.to(w.dtype), w):
        return g.mul_(per_sample_view(narrow, g))
    rows = g.view(g.shape[0], -1) if g.is_contiguous() else None
    if rows is None:
        return g.mul_(per_sample_view(w, g))
    height = max(1, _SCALE_BLOCK_ELEMENTS // max(rows.shape[1], 1))
    for r0 in range(0, rows.shape[0], height):
        block = rows[r0:r0 + height]
        block.copy_(block.to(w.dtype).mul_(w[r0:r0 + height, None]))
    return g


def _mixed_per_sample(g: Tensor, w: Tensor) -> bool:
    """A CPU buffer narrower than its per-sample weights: PyTorch's mixed-dtype path."""
    return w.dim() != 0 and g.dtype.itemsize < w.dtype.itemsize and g.device.type == "cpu"


def scale_gradients(ctx, pairs: Sequence[tuple[Tensor, Tensor] | None]) -> list:
    """``g * w`` for each (g, w) in ``pairs`` (None entries pass through), each ``g``
    a gradient buffer that the op allocated and saved. In place where
    ``may_scale_in_place``; otherwise a new tensor. In-place scalings run on the
    backend the op's forward ran on (``ctx.backend``, set at setup: never
    re-read here, where ``FASTVAE_BACKEND`` may have changed). On the kernels
    they share one launch, which leaves a buffer untouched where w is exactly 1
    (the usual ``loss.backward()``), deciding on the device. ``w`` stays in the
    loss dtype (float32 or float64): one rounding, at the end, to ``g``'s dtype."""
    out = [None] * len(pairs)
    in_place = []
    backward_may_write = _backward_may_write(ctx)  # may_scale_in_place, its per-call half once
    for i, pair in enumerate(pairs):
        if pair is None:
            continue
        g, w = pair
        if backward_may_write and _unshared(g):
            in_place.append(i)
        elif not _mixed_per_sample(g, w):
            out[i] = g * per_sample_view(w, g)
        else:  # a half-precision buffer: a copy in its dtype, scaled as in place
            out[i] = _scale_in_place(g.clone(), w)
    if not in_place:
        return out
    # a forward on the kernels had no float64 input (those take the PyTorch path),
    # so no float64 gradient goes through the kernels' float32 arithmetic here
    if ctx.backend == "triton":
        from fastvae import kernels

        device = pairs[in_place[0]][0].device
        # skips the pass on the device when w is 1: no sync
        kernels.scale_gradients_([(pairs[i][0], pairs[i][1].to(device=device)) for i in in_place])
        for i in in_place:
            out[i] = pairs[i][0]
        return out
    w_is_one = {}  # one read per weight shared by several buffers
    for i in in_place:
        g, w = pairs[i]
        one = w_is_one.get(id(w))
        if one is None:
            # the usual loss.backward(): reading a CPU scalar is no device sync
            one = w_is_one[id(w)] = w.dim() == 0 and w.device.type == "cpu" and w.item() == 1.0
        out[i] = g if one else _scale_in_place(g, w)
    return out
