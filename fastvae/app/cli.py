"""The ``fastvae`` command line: ``fastvae COMMAND [options]``.

Each command lives in the module that implements it, which defines
``add_arguments(parser)`` and ``run(args) -> int``; only the module of the
command being run is imported (``infer`` must work without PyTorch).
"""

import argparse
import importlib
import sys

# command -> (module, one-line help)
COMMANDS = {
    "train": ("fastvae.app.train", "train an autoencoder or a VAE"),
    "demo": ("fastvae.app.demo", "train an AE and a VAE on digits and compare them"),
    "export": ("fastvae.app.export", "export a trained checkpoint to ONNX"),
    "infer": ("fastvae.app.infer", "sample, reconstruct or score with an exported model (no PyTorch)"),
}

# Errors that mean "bad input": reported in one line, exit code 2. Any other OSError
# is the system failing mid-way (disk full, file too large, I/O error): one line, exit
# code 1. Ctrl-C: one line, exit code 130 (128 + SIGINT, as shells report it); the
# atomic writes leave no half-written file either way.
USER_ERRORS = (ValueError, TypeError, FileNotFoundError, NotADirectoryError,
               PermissionError, IsADirectoryError)
EXIT_CODES = ("0 done, 1 a system error (disk full, file too large, I/O, out of memory, a "
              "missing package), "
              "2 bad input, 130 interrupted")


def _usage():
    lines = ["usage: fastvae COMMAND [options]", "", "commands:"]
    lines += [f"  {name:<8} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "Run 'fastvae COMMAND --help' for a command's options.", f"Exit codes: {EXIT_CODES}."]
    return "\n".join(lines)


def _reason(err):
    """The error's message; an OSError's without its "[Errno N]" prefix, with its file."""
    if isinstance(err, OSError) and err.strerror:
        return err.strerror + (f": {err.filename}" if err.filename else "")
    # (a message from torch's C++ may carry its stack trace: not for the user)
    return str(err).split("\nException raised from ")[0]


def _out_of_memory(err):
    """torch's allocators raise RuntimeError, not MemoryError: on the CPU "DefaultCPUAllocator:
    can't allocate memory", on a GPU torch.OutOfMemoryError (named, not imported: this module
    runs without torch)."""
    return type(err).__name__ == "OutOfMemoryError" or "can't allocate memory" in str(err)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        # asked for: stdout, exit 0; no command given: an error, on stderr
        print(_usage(), file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"fastvae: unknown command {command!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module_name, help_ = COMMANDS[command]
    try:
        module = importlib.import_module(module_name)
        parser = argparse.ArgumentParser(prog=f"fastvae {command}", description=help_,
                                         epilog=f"Exit codes: {EXIT_CODES}.")
        module.add_arguments(parser)
        args = parser.parse_args(rest)
        return int(module.run(args) or 0)
    except USER_ERRORS as err:
        print(f"fastvae {command}: error: {_reason(err)}", file=sys.stderr)
        return 2
    except (OSError, ImportError) as err:  # (ImportError: an optional package not installed)
        print(f"fastvae {command}: error: {_reason(err)}", file=sys.stderr)
        return 1
    except MemoryError:
        print(f"fastvae {command}: error: out of memory", file=sys.stderr)
        return 1
    except RuntimeError as err:
        if not _out_of_memory(err):
            raise
        print(f"fastvae {command}: error: out of memory: {str(err).splitlines()[0][:200]}",
              file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"fastvae {command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
