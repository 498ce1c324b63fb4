"""One whole training step (forward, loss, backward, Adam) of an MLP VAE at
MNIST size and a conv VAE at 64x64: what the loss speedup means for a step."""

OPS = ("train_step",)


def test_train_step(run_case, device, case, impl):
    run_case(device, case, impl)
