"""vae_loss forward, and forward+backward, against the baselines (mse, bce,
bce_logits; reductions sum and none)."""

OPS = ("loss_fwd", "loss_fwd_bwd")


def test_loss(run_case, device, case, impl):
    run_case(device, case, impl)
