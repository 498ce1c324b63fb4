"""The fused CPU loops' state for a test (fastvae/_cpu_fusion.py): shared by the
tests of the reconstruction, KL, sampling and small-loss loops."""

import pytest
import torch

from fastvae import _cpu_fusion, _torch_impl, _validate


def record_fused_calls(monkeypatch, entry, **thresholds):
    """Fusion on with fresh state (each test counts from a kind's first call), the
    given module thresholds set (``MIN_NUMEL=64``; ``SMALL_NUMEL`` is _torch_impl's),
    all restored afterwards. Returns a list recording each call of the entry point
    ``entry`` (``"fused_recon"``, ``"fused_kl"``, ``"fused_sample"``,
    ``"fused_small_values"``, ``"fused_small_grads"``): True where the fused loop served
    it, False where the torch ops are to, "raised" where it raised (its targets' check)."""
    for name, value in thresholds.items():
        module = _torch_impl if name == "SMALL_NUMEL" else _cpu_fusion
        monkeypatch.setattr(module, name, value)
    monkeypatch.setattr(_cpu_fusion, "_enabled", True)
    monkeypatch.setattr(_cpu_fusion, "_failed", False)
    monkeypatch.setattr(_cpu_fusion, "_small_failed", False)
    monkeypatch.setattr(_cpu_fusion, "_calls", {})
    monkeypatch.setattr(_cpu_fusion, "_compiled", {})
    monkeypatch.setattr(_cpu_fusion, "_worked", set())
    monkeypatch.setattr(_cpu_fusion, "_fast", {})
    outcomes = []
    real = getattr(_cpu_fusion, entry)

    def recorded(*args, **kwargs):
        try:
            out = real(*args, **kwargs)
        except Exception:
            outcomes.append("raised")
            raise
        outcomes.append(out is not None)
        return out

    monkeypatch.setattr(_cpu_fusion, entry, recorded)
    return outcomes


def count_compilations(monkeypatch):
    """A list that grows by one entry per graph Inductor compiles for the fused loops
    (``torch._inductor.standalone_compile``, their only way to the compiler)."""
    import torch._inductor

    compilations = []
    real = torch._inductor.standalone_compile

    def counted(*args, **kwargs):
        compilations.append(args[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(torch._inductor, "standalone_compile", counted)
    return compilations


def count_target_passes(monkeypatch):
    """A list that grows by one entry (the name checked) per pass made over a tensor to
    check that it lies in [0, 1] (``_validate._check_unit_interval``: aminmax)."""
    passes = []
    real = _validate._check_unit_interval

    def counted(name, t, what):
        passes.append(name)
        return real(name, t, what)

    monkeypatch.setattr(_validate, "_check_unit_interval", counted)
    return passes


def assert_the_loop_checks_the_targets(monkeypatch, loss_of, x, outcomes):
    """``loss_of(target)`` (a loss of bce, bce_logits or the continuous Bernoulli, whose
    fused entry point ``outcomes`` records) checks its targets in the fused loop's pass:
    the torch ops' warm-up calls make a pass of their own over x, the fused call none, and
    a target of 1.5, -0.25 or NaN raises from inside the loop's call, naming x's range."""
    passes = count_target_passes(monkeypatch)
    for _ in range(_cpu_fusion.COMPILE_AT_CALL):
        loss_of(x)
    assert outcomes[-1] is True
    assert passes == ["x"] * (_cpu_fusion.COMPILE_AT_CALL - 1)
    for bad in (1.5, -0.25, float("nan")):
        bad_x = x.clone()
        bad_x.view(-1)[-1] = bad  # (in a padded row's last block where rows are padded)
        lo, hi = (float(v) for v in torch.aminmax(bad_x.float()))
        with pytest.raises(ValueError, match=rf"^x must hold targets in \[0, 1\] for this recon, "
                                             rf"got values in \[{lo:.6g}, {hi:.6g}\]$"):
            loss_of(bad_x)
        assert outcomes[-1] == "raised"  # (the loop ran and its excess sent the check)
