"""What the tests of the CLI's export, infer and failure paths share: a one-epoch
run's options, the repository root, their pytest marks and the one-line-error check."""

import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ONE_EPOCH = ["--hidden", "32", "16", "--latent-dim", "4", "--epochs", "1", "--no-progress"]
# torch's exporter trips its own deprecation warning (torch 2.13); not ours to fix
MARKS = [pytest.mark.usefixtures("one_thread"),
         pytest.mark.filterwarnings("ignore:.*LeafSpec.*:FutureWarning")]


def assert_one_line(code, err, want_code, *words):
    """Exit code ``want_code`` and a one-line message on stderr holding every word."""
    assert code == want_code and len(err.strip().splitlines()) == 1, err
    for word in words:
        assert word in err, err
