"""Triton kernels for fastvae (installed as ``fastvae.kernels``).

Each fused operation lives in its own module with its math, its kernels and
the launcher that picks block sizes:

- ``vae_loss``: reconstruction + beta * KL with its gradients in one pass
  (also the KL-only op; free bits add a pre-pass that sums each latent
  element's KL down the batch);
- ``reparameterize``: z = mu + exp(logvar / 2) * eps with in-kernel Philox
  noise seeded from memory (a 1-element int64 tensor on the device, so CUDA
  graph replays draw fresh noise), optionally the per-sample KL, and the
  backward that regenerates eps;
- ``scale_gradients``: the backward of the loss and KL ops, scaling their
  saved gradients by grad_output in place (up to three buffers, one launch).

This package exposes the same functions as ``fastvae._torch_impl``, plus
``scale_gradient_`` / ``scale_gradients_`` (the loss backward's in-place
scaling of up to three buffers in one launch, skipped on the
device when grad_output is 1);
``fastvae._dispatch`` decides which one runs. Importing it imports triton
(``import fastvae`` does not). ``AVAILABLE`` is False when triton cannot be
imported.
"""

try:
    import triton  # noqa: F401
except ImportError:
    AVAILABLE = False
else:
    AVAILABLE = True
    from .reparameterize import (  # noqa: F401
        reparameterize_backward,
        reparameterize_backward_with_prior,
        reparameterize_forward,
        reparameterize_forward_with_prior,
    )
    from .scale_gradients import scale_gradient_, scale_gradients_  # noqa: F401
    from .vae_loss import (  # noqa: F401
        kl_forward,
        kl_forward_with_prior,
        vae_loss_forward,
        vae_loss_forward_with_prior,
    )

__all__ = ["AVAILABLE", "vae_loss_forward", "kl_forward", "vae_loss_forward_with_prior",
           "kl_forward_with_prior",
           "reparameterize_forward", "reparameterize_backward",
           "reparameterize_forward_with_prior", "reparameterize_backward_with_prior", "scale_gradient_",
           "scale_gradients_"]
