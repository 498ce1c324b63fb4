"""Atomic file writes: a crash or an error mid-write leaves the old file (or
none), never a half-written one. Torch-free: the runtime uses it too."""

import os
import tempfile


def atomic_write(path, write):
    """Call ``write(tmp_path)`` then move ``tmp_path`` onto ``path`` atomically.
    On any error the temporary file is removed and ``path`` is untouched."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it 0600; give it the usual mode
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_write_stream(path, write):
    """Like ``atomic_write`` but ``write`` gets the open binary file."""
    def write_path(tmp):
        with open(tmp, "wb") as f:
            write(f)
    atomic_write(path, write_path)


def atomic_write_text(path, text):
    atomic_write_stream(path, lambda f: f.write(text.encode("utf-8")))


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask
