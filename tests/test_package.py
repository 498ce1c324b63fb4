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
