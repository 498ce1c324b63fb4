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

# Errors that mean "bad input": reported in one line, exit code 2.
USER_ERRORS = (ValueError, TypeError, FileNotFoundError, NotADirectoryError,
               PermissionError, IsADirectoryError)


def _usage():
    lines = ["usage: fastvae COMMAND [options]", "", "commands:"]
    lines += [f"  {name:<8} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "Run 'fastvae COMMAND --help' for a command's options."]
    return "\n".join(lines)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"fastvae: unknown command {command!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module_name, help_ = COMMANDS[command]
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog=f"fastvae {command}", description=help_)
    module.add_arguments(parser)
    args = parser.parse_args(rest)
    try:
        return int(module.run(args) or 0)
    except USER_ERRORS as err:
        print(f"fastvae {command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
