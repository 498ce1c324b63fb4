"""fastvae's benchmark suite: fastvae against eager PyTorch, torch.compile and
torch.distributions on the same cases (see ``benchmarks.cases``)."""
