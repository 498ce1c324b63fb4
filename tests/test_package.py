"""`import fastvae` stays light: no torch, no triton until the torch API is used."""

import subprocess
import sys


def run(code):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout


def test_import_is_lazy():
    out = run("import sys, fastvae; "
              "print('torch' in sys.modules, 'triton' in sys.modules, fastvae.__version__)")
    assert out.split()[:2] == ["False", "False"]


def test_lazy_attributes_resolve_without_importing_triton():
    out = run("import sys, fastvae; f = fastvae.vae_loss; print(callable(f), 'triton' in sys.modules, "
              "sorted(set(fastvae.__all__) - set(dir(fastvae))))")
    assert out.split("\n")[0] == "True False []"


PUBLIC_MODULES = ["fastvae", "fastvae.functional", "fastvae.modules", "fastvae.posterior",
                  "fastvae.models", "fastvae.onnx", "fastvae.runtime",
                  "fastvae.integrations.diffusers"]


def _public_callables(module):
    """(name, function) of what ``module`` offers: its functions, and its classes'
    public methods, __init__ and property getters (defined in fastvae)."""
    import inspect

    names = getattr(module, "__all__", None) or [n for n in dir(module) if not n.startswith("_")]
    for name in names:
        obj = getattr(module, name)
        if inspect.isfunction(obj) and obj.__module__.startswith("fastvae"):
            yield name, obj
        elif inspect.isclass(obj) and obj.__module__.startswith("fastvae"):
            for attr, value in vars(obj).items():
                if isinstance(value, property):
                    value = value.fget
                if inspect.isfunction(value) and (not attr.startswith("_") or attr == "__init__"):
                    yield f"{name}.{attr}", value


def test_the_public_api_is_type_annotated():
    """Every parameter and return of the public functions and methods has a type hint."""
    import importlib
    import inspect

    missing = []
    for module_name in PUBLIC_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ImportError:  # (an optional extra: diffusers)
            continue
        for name, fn in _public_callables(module):
            sig = inspect.signature(fn)
            for param in sig.parameters.values():
                if param.name not in ("self", "cls") and param.annotation is inspect.Parameter.empty \
                        and param.kind not in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
                    missing.append(f"{module_name}.{name}({param.name})")
            if sig.return_annotation is inspect.Signature.empty:
                missing.append(f"{module_name}.{name} -> ?")
    assert not missing, f"public API without type hints: {missing}"
