"""fastvae against its baselines, interleaved in one process: for a busy machine.

    python -m benchmarks.interleaved [--group fixed_cost|suite|all] [--match TEXT]
                                     [--baseline eager] [--threads N] [--rounds 40]
                                     [--device cpu|cuda|auto] [--json PATH]

``make bench`` times each implementation in its own block of rounds, so on a
machine shared with other work a burst of load lands on one side. Here every
round times a block of fastvae calls and a block of baseline calls back to back
(alternating which goes first), and the ratio is the median over rounds of
baseline time / fastvae time: load that lasts longer than a round hits both
sides alike. Each case is first checked against the float64 reference.
``--json PATH`` writes the results for ``benchmarks.report --interleaved`` (``make
bench`` runs every case, ``--group all``, and the report shows these ratios).
"""

import argparse
import datetime
import statistics
import sys
import time

import torch

from benchmarks import cases, report

BLOCK_SECONDS = 2e-3  # one timed block of calls per implementation per round


def _calls_per_block(step):
    start = time.perf_counter()
    step()
    once = max(time.perf_counter() - start, 1e-7)
    return max(1, int(BLOCK_SECONDS / once))


def compare(case, device, baseline="eager", rounds=40):
    """{"fastvae": median s/call, baseline: median s/call, "ratio": median of per-round
    baseline/fastvae}."""
    impls = ("fastvae", baseline)
    if case.op == "train_step":
        # checked on inputs of its own: the check turns the model it is given into float64
        case.check("fastvae", device)
    inputs = case.inputs(device)
    steps = {impl: case.step(impl, inputs) for impl in impls}
    for step in steps.values():  # warm up: caches, allocator, lazy imports, and the
        for _ in range(3):  # call at which fastvae's fused CPU loops compile (the third)
            step()
    if case.op != "train_step":  # (a training step returns the loss alone)
        case.verify("fastvae", inputs, steps["fastvae"]())  # what is timed is checked
    calls = {impl: _calls_per_block(steps[impl]) for impl in impls}
    per_call = {impl: [] for impl in impls}
    for r in range(rounds):
        for impl in impls if r % 2 == 0 else impls[::-1]:
            step, n = steps[impl], calls[impl]
            cases.synchronize(device)
            start = time.perf_counter()
            for _ in range(n):
                step()
            cases.synchronize(device)
            per_call[impl].append((time.perf_counter() - start) / n)
    ratios = [b / f for f, b in zip(per_call["fastvae"], per_call[baseline])]
    return {"fastvae": statistics.median(per_call["fastvae"]),
            baseline: statistics.median(per_call[baseline]),
            "ratio": statistics.median(ratios)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--group", choices=("fixed_cost", "suite", "all"), default="fixed_cost")
    parser.add_argument("--device", default="cpu",
                        help="cpu, cuda, or auto (cuda where present, else cpu)")
    parser.add_argument("--match", default="", help="only cases whose id contains this")
    parser.add_argument("--baseline", default="eager", choices=cases.BASELINES)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--json", default=None, help="also write the results to this file")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    chosen = []
    if args.group in ("fixed_cost", "all"):
        chosen += cases.fixed_cost_suite(device)
    if args.group in ("suite", "all"):
        seen = {c.id for c in chosen}
        chosen += [c for c in cases.suite(device) if c.id not in seen]
    chosen = [c for c in chosen if args.match in c.id and args.baseline in c.impls]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {device}, "
          f"{args.rounds} interleaved rounds")
    print(f"| case | fastvae | {args.baseline} | {args.baseline} / fastvae |")
    print("|---|---|---|---|")
    results = {}
    for case in chosen:
        got = compare(case, device, args.baseline, args.rounds)
        results[case.id] = {"fastvae_s": got["fastvae"], "baseline_s": got[args.baseline],
                            "ratio": got["ratio"]}
        print(f"| `{case.id}` | {got['fastvae'] * 1e6:.1f} µs | {got[args.baseline] * 1e6:.1f} µs "
              f"| {got['ratio']:.2f}× |", flush=True)
        if args.json:  # after every case: a run cut short keeps what it measured
            report.write_json(args.json, {
                "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                "torch": torch.__version__, "threads": torch.get_num_threads(),
                "device": device, "baseline": args.baseline, "rounds": args.rounds,
                "cases": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
