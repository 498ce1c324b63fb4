"""Atomic file writes: a crash or an error mid-write leaves the old file (or
none), never a half-written one. Torch-free: the runtime uses it too.

A temporary is named ``.<name>.tmp-<host>-<pid>-<random>`` beside its target,
so that one left behind by a killed process (SIGKILL runs no clean-up) can be
told from one being written right now: the next write to the same place
removes those of this host whose process no longer exists.
"""

import hashlib
import os
import re
import shutil
import socket
import tempfile


def _host_tag():
    """8 hex digits naming this machine (a directory may be shared between hosts,
    whose process ids say nothing about each other)."""
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def temp_prefix(path):
    """The prefix of this process's temporaries for ``path`` (``tempfile``'s ``prefix``)."""
    return f".{os.path.basename(os.path.abspath(path))}.tmp-{_host_tag()}-{os.getpid()}-"


def _process_exists(pid):
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except OSError:  # e.g. PermissionError: it exists, under another user
        return True
    return True


def remove_stale_temps(path):
    """Remove the temporaries (files or directories) of ``path`` left by processes
    of this host that no longer run. Those of live processes are left alone."""
    if os.name != "posix":  # os.kill(pid, 0) is not a harmless probe elsewhere
        return
    directory, base = os.path.split(os.path.abspath(path))
    pattern = re.compile(re.escape(f".{base}.tmp-{_host_tag()}-") + r"(\d+)-")
    try:
        names = os.listdir(directory)
    except OSError:
        return
    for name in names:
        match = pattern.match(name)
        if match is None or _process_exists(int(match.group(1))):
            continue
        stale = os.path.join(directory, name)
        if os.path.isdir(stale) and not os.path.islink(stale):
            shutil.rmtree(stale, ignore_errors=True)
        else:
            try:
                os.remove(stale)
            except OSError:
                pass


def write_error(err, what):
    """``err`` (an OSError) as ``what: its reason``: OSError(errno, ...) keeps the errno's
    subclass (PermissionError stays one); an error without an errno (e.g. a library's
    wrapped write failure) gets none, not "[Errno None]"."""
    text = f"{what}: {err.strerror or err}"
    return OSError(err.errno, text) if err.errno is not None else OSError(text)


def atomic_write(path, write):
    """Call ``write(tmp_path)`` then move ``tmp_path`` onto ``path`` atomically.
    On any error the temporary file is removed and ``path`` is untouched."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    try:
        remove_stale_temps(path)
        fd, tmp = tempfile.mkstemp(prefix=temp_prefix(path), dir=directory)
    except OSError as err:  # (named by path, not by the temporary's name)
        raise write_error(err, f"cannot write {path}") from None
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it 0600; give it the usual mode
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(err, OSError):
            # say which file failed (a full disk or a file-size limit names none, or the
            # temporary); OSError(errno, ...) keeps the errno's subclass
            raise write_error(err, f"cannot write {path}") from err
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
