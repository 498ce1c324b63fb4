"""reparameterize, sample_and_kl (forward+backward) and kl_divergence against
the baselines; the noise each implementation drew is recovered from its z."""

OPS = ("reparam_fwd_bwd", "reparam_kl_fwd_bwd", "kl_fwd_bwd")


def test_sampling(run_case, device, case, impl):
    run_case(device, case, impl)
