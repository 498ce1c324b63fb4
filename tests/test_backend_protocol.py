"""Both backends implement fastvae._dispatch.Backend: the same functions with the
same parameters (names, order, kinds, defaults) and, where a backend annotates
them, the same types."""

import inspect
import typing

import pytest

from fastvae import _dispatch, _torch_impl

PROTOCOL_FUNCTIONS = ("vae_loss_forward", "kl_forward", "vae_loss_forward_with_prior",
                      "kl_forward_with_prior", "reparameterize_forward",
                      "reparameterize_backward", "reparameterize_forward_with_prior",
                      "reparameterize_backward_with_prior")


def backends():
    from fastvae import kernels

    assert kernels.AVAILABLE, "triton is a test dependency: the kernels must import"
    return {"fastvae._torch_impl": _torch_impl, "fastvae.kernels": kernels}


def protocol_signature(name):
    """The protocol method's signature without ``self`` (the module stands for it)."""
    sig = inspect.signature(getattr(_dispatch.Backend, name))
    params = list(sig.parameters.values())
    assert params[0].name == "self"
    return sig.replace(parameters=params[1:])


def test_the_protocol_states_exactly_these_functions_with_type_hints():
    declared = {n for n, v in vars(_dispatch.Backend).items()
                if callable(v) and not n.startswith("_")}
    assert declared == set(PROTOCOL_FUNCTIONS)
    for name in PROTOCOL_FUNCTIONS:
        hints = typing.get_type_hints(getattr(_dispatch.Backend, name))
        params = [p for p in protocol_signature(name).parameters]
        assert set(params) <= set(hints), f"{name}: parameters without a type hint"
        assert "return" in hints, f"{name}: no return type"


def mismatch(fn, name):
    """Why ``fn`` does not implement the protocol's ``name``, or None if it does:
    parameters (names, order, kinds, defaults) must be the protocol's, and a type
    hint the backend gives must be the protocol's."""
    want = protocol_signature(name)
    got = inspect.signature(fn)
    if [(p.name, p.kind, p.default) for p in got.parameters.values()] != \
            [(p.name, p.kind, p.default) for p in want.parameters.values()]:
        return f"{name}{got} is not the protocol's {name}{want}"
    want_hints = typing.get_type_hints(getattr(_dispatch.Backend, name))
    for param, hint in typing.get_type_hints(fn).items():
        if hint != want_hints.get(param):
            return f"{name}: {param} is annotated {hint}, the protocol says {want_hints.get(param)}"
    return None


@pytest.mark.parametrize("backend", ["fastvae._torch_impl", "fastvae.kernels"])
@pytest.mark.parametrize("name", PROTOCOL_FUNCTIONS)
def test_backend_matches_the_protocol(backend, name):
    fn = getattr(backends()[backend], name, None)
    assert callable(fn), f"{backend} has no function {name}"
    assert mismatch(fn, name) is None, f"{backend}: {mismatch(fn, name)}"


@pytest.mark.parametrize("backend", ["fastvae._torch_impl", "fastvae.kernels"])
def test_backend_is_an_instance_of_the_runtime_checkable_protocol(backend):
    assert isinstance(backends()[backend], _dispatch.Backend)


def test_the_check_catches_a_wrong_signature_behind_a_right_name():
    def swapped(mu, logvar, seed, clamp_hi, clamp_lo, with_kl):
        raise AssertionError("never called")

    def missing_default_kind(mu, logvar, seed, clamp_lo, clamp_hi, *, with_kl):
        raise AssertionError("never called")

    def wrong_hint(mu, logvar, seed: float, clamp_lo, clamp_hi, with_kl):
        raise AssertionError("never called")

    for fn in (swapped, missing_default_kind, wrong_hint):
        assert mismatch(fn, "reparameterize_forward") is not None, fn.__name__
