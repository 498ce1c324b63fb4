"""Failures that are not bad input end in one line, not a traceback: a write that
fails (here a file-size limit, as `ulimit -f` sets; a full disk raises the same
OSError) exits 1, Ctrl-C exits 130, and neither leaves a half-written file. Each
printed a traceback before its fix (independent review of the CLI)."""

import os
import resource
import signal
import subprocess
import sys
import threading

import pytest
from cli_helpers import MARKS, ONE_EPOCH, REPO, assert_one_line

from fastvae.app import checkpoint, cli

pytest.importorskip("onnxscript", reason="the dynamo ONNX exporter needs onnxscript")
pytest.importorskip("onnxruntime")

pytestmark = MARKS


def fastvae(*args, file_size_limit=None):
    """Run `python -m fastvae ARGS` in a fresh process, its files capped at
    ``file_size_limit`` bytes (Python ignores SIGXFSZ: a write past it fails with EFBIG)."""
    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_size_limit, file_size_limit))

    env = {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "fastvae", *map(str, args)], env=env,
                          capture_output=True, text=True, timeout=240,
                          preexec_fn=limit if file_size_limit else None)


def files_under(path):
    return sorted(os.path.relpath(os.path.join(d, f), path) for d, _, fs in os.walk(path) for f in fs)


def test_a_failed_write_is_one_line_and_exit_code_1(tmp_path):
    """`ulimit -f` then train/export/infer: safetensors' SafetensorError and OSError
    "File too large" tracebacks before."""
    # train: the checkpoint (safetensors) is larger than the limit
    result = fastvae("train", "--out", tmp_path / "run", "--epochs", "1", "--no-progress",
                     file_size_limit=64 * 1024)
    assert_one_line(result.returncode, result.stderr, 1, "fastvae train: error: cannot write",
                    checkpoint.FILENAME, "File too large")
    assert not (tmp_path / "run").exists()  # (created for the run, removed with nothing in it)

    assert cli.main(["train", "--out", str(tmp_path / "small"), *ONE_EPOCH]) == 0
    result = fastvae("export", tmp_path / "small", "--out", tmp_path / "onnx", file_size_limit=8 * 1024)
    assert_one_line(result.returncode, result.stderr, 1,
                    "fastvae export: error: cannot write the export", "File too large")
    assert not (tmp_path / "onnx").exists()
    assert [f for f in os.listdir(tmp_path) if ".tmp" in f] == []

    assert cli.main(["export", str(tmp_path / "small"), "--out", str(tmp_path / "onnx")]) == 0
    for out in ("samples.npy", "samples.png"):
        result = fastvae("infer", tmp_path / "onnx", "--sample", "500", "--out", tmp_path / out,
                         file_size_limit=16 * 1024)
        assert_one_line(result.returncode, result.stderr, 1,
                        f"fastvae infer: error: cannot write {tmp_path / out}")
    assert sorted(os.listdir(tmp_path)) == ["onnx", "small"]


def test_ctrl_c_is_one_line_and_exit_code_130(tmp_path):
    """Ctrl-C during training printed a KeyboardInterrupt traceback (exit -2); the
    checkpoint of the last finished epoch stays, with no temporary beside it."""
    env = {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "fastvae", "train", "--out", str(tmp_path / "run"), "--hidden", "32",
         "16", "--epochs", "100000"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # a progress line that never matches must fail the test, not hang the suite
    watchdog = threading.Timer(120, proc.kill)
    watchdog.start()
    try:
        for line in proc.stderr:  # not a terminal: one progress line per epoch
            if ": epoch 2/" in line:  # epoch 1's checkpoint is saved by now
                break
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        watchdog.cancel()
        proc.kill()
    assert proc.returncode == 130, err
    assert err.strip() == "fastvae train: interrupted", err
    assert checkpoint.load(tmp_path / "run")[0]["train"]["epoch"] >= 1
    assert files_under(tmp_path / "run") == sorted([checkpoint.FILENAME, checkpoint.CONFIG_FILENAME])


def test_a_missing_optional_package_is_one_line_and_exit_code_1(monkeypatch, capsys):
    """An ImportError naming what to install (here: export without onnxscript) is not a
    traceback."""
    from fastvae.app import cli, export

    def needs_onnxscript(args):
        raise ImportError("fastvae.onnx.export needs onnxscript: pip install onnxscript")

    monkeypatch.setattr(export, "run", needs_onnxscript)
    assert cli.main(["export", "ckpt", "--out", "o"]) == 1
    err = capsys.readouterr().err.strip()
    assert err == "fastvae export: error: fastvae.onnx.export needs onnxscript: pip install onnxscript"


def test_training_on_mnist_without_torchvision_is_exit_code_1(tmp_path, monkeypatch, capsys):
    """A missing optional package is exit code 1 (README, --help); torchvision's absence
    was reported as bad input, exit code 2."""
    monkeypatch.setitem(sys.modules, "torchvision", None)  # import fails as if not installed
    monkeypatch.setitem(sys.modules, "torchvision.datasets", None)
    code = cli.main(["train", "--data", "mnist", "--out", str(tmp_path / "run"), *ONE_EPOCH])
    assert_one_line(code, capsys.readouterr().err, 1, "fastvae train: error: data 'mnist' needs "
                    "torchvision, which is not installed")
    assert not (tmp_path / "run").exists()


def test_a_bad_input_os_error_reads_without_its_errno(monkeypatch, capsys):
    import errno

    from fastvae import _io
    from fastvae.app import cli, export

    def refused(args):
        raise _io.write_error(PermissionError(errno.EACCES, "Permission denied"), "cannot write x")

    monkeypatch.setattr(export, "run", refused)
    assert cli.main(["export", "ckpt", "--out", "o"]) == 2
    assert capsys.readouterr().err.strip() == "fastvae export: error: cannot write x: Permission denied"


def test_no_command_prints_usage_to_stderr_with_exit_code_2(capsys):
    """Usage for a missing command is an error (it went to stdout); asked for, stdout and 0."""
    assert cli.main([]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("usage: fastvae COMMAND")
    assert cli.main(["--help"]) == 0
    out, err = capsys.readouterr()
    assert err == "" and out.startswith("usage: fastvae COMMAND")


def test_an_unreadable_checkpoint_says_permission_denied(tmp_path, monkeypatch, capsys):
    """safetensors reports a permission error as "No such file or directory"."""
    from fastvae.models import MLPVAE

    checkpoint.save(tmp_path / "run", MLPVAE((4,), hidden=(3,)))
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p).endswith(
        checkpoint.FILENAME) else real_access(p, mode))  # (tests may run as root, who reads all)
    code = cli.main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "o")])
    assert_one_line(code, capsys.readouterr().err, 2, "is not readable (permission denied)")


def test_a_read_only_folder_is_named_not_the_temporary(tmp_path, monkeypatch, capsys):
    """An --out in a folder the user cannot write named the hidden temporary file."""
    import errno
    import tempfile

    def refused(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(tmp_path / ".x.tmp-123"))

    monkeypatch.setattr(tempfile, "mkstemp", refused)
    monkeypatch.setattr(tempfile, "mkdtemp", refused)
    from fastvae import _io

    with pytest.raises(PermissionError, match=r"cannot write .*out\.json: Permission denied") as info:
        _io.atomic_write(tmp_path / "out.json", lambda tmp: None)
    assert ".tmp-" not in str(info.value)


@pytest.mark.parametrize("error", [
    MemoryError(),
    RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 800000000000 "
                 "bytes. Error code 12 (Cannot allocate memory)\nException raised from ..."),
], ids=["MemoryError", "torch-cpu-allocator"])
def test_running_out_of_memory_is_one_line_and_exit_code_1(monkeypatch, capsys, error):
    """A system failure (exit 1), not a traceback: torch's CPU allocator raises RuntimeError
    (e.g. saving the first checkpoint of a model that only just fit for training)."""
    from fastvae.app import export

    def out_of_memory(args):
        raise error

    monkeypatch.setattr(export, "run", out_of_memory)
    code = cli.main(["export", "ckpt", "--out", "o"])
    assert_one_line(code, capsys.readouterr().err, 1, "fastvae export: error: out of memory")


def test_other_runtime_errors_still_show_their_traceback(monkeypatch):
    """Anything else is a bug, shown with its traceback (README)."""
    from fastvae.app import export

    def bug(args):
        raise RuntimeError("a bug")

    monkeypatch.setattr(export, "run", bug)
    with pytest.raises(RuntimeError, match="a bug"):
        cli.main(["export", "ckpt", "--out", "o"])
