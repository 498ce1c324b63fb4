"""The "fixed cost" group (issue 12): each op at sizes where the call itself
(argument checks, dispatch, autograd bookkeeping) is most or all of the time —
2x4 tensors with 2x2 latents, and the MNIST MLP's 128x784 with 128x20 latents —
in float32 and bfloat16, against the baselines. The cases are
``cases.fixed_cost_suite``; they run in CI mode too (they are small)."""

from benchmarks import cases

GROUP = "fixed_cost"  # the conftest takes this module's cases from cases.fixed_cost_suite
OPS = cases.FIXED_COST_OPS


def test_fixed_cost(run_case, device, case, impl):
    run_case(device, case, impl)
