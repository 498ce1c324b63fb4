"""fastvae: fused, exact VAE losses and sampling for PyTorch.

The torch-based API is exposed lazily (module ``__getattr__``) so that
``import fastvae`` stays light and ``fastvae.runtime`` can be used on machines
that have numpy and onnxruntime but no PyTorch.
"""

from importlib import import_module

__version__ = "0.1.0"

# public name -> module that defines it
_LAZY = {
    "vae_loss": "fastvae.functional",
    "kl_divergence": "fastvae.functional",
    "reparameterize": "fastvae.functional",
    "sample_and_kl": "fastvae.functional",
    "LossParts": "fastvae.functional",
    "VAELoss": "fastvae.modules",
    "GaussianPosterior": "fastvae.posterior",
    "set_backend": "fastvae._dispatch",
    "use_backend": "fastvae._dispatch",
    "set_cpu_fusion": "fastvae._cpu_fusion",
}

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'fastvae' has no attribute {name!r}")
    value = getattr(import_module(module), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
