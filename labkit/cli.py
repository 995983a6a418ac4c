"""The ``labkit`` command: doctor, bench, and the lab runner and trainers.

labkit doctor                                   what this machine can run, and why not
labkit bench --model twin:sd15 --preset baseline --preset tier1 --out results.jsonl
labkit bench --model shapes --apply dpm_solver:steps=20 fp16 --label mine
labkit compare base.jsonl new.jsonl --time-tolerance 0.1   exit 1 if new is slower or worse
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings

from tqdm import tqdm

from labkit.models import SourceError


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["train-shapes"]:
        # argparse's REMAINDER drops a first argument that looks like a flag ("--preset"): hand over as is
        from labkit.shapes.train import cli_main

        return cli_main(argv[1:])
    parser = argparse.ArgumentParser(
        prog="labkit", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)

    doctor = commands.add_parser(
        "doctor", help="hardware, versions, and which optimizations and presets can run here"
    )
    doctor.add_argument("--json", action="store_true", help="print the report as JSON")

    bench = commands.add_parser("bench", help="benchmark presets or optimizations and append result records")
    bench.add_argument(
        "--model", default="shapes", help="shapes | twin:NAME | a folder | a hub id (default: shapes)"
    )
    bench.add_argument("--preset", action="append", default=[], help="a preset (repeat to compare several)")
    bench.add_argument(
        "--apply",
        nargs="+",
        default=None,
        metavar="OPT",
        help="optimizations instead of a preset, e.g. dpm_solver:steps=20 fp16 torch_compile:mode=reduce-overhead",
    )
    bench.add_argument("--label", default=None, help="label of the --apply configuration")
    bench.add_argument("--steps", type=int, default=None)
    bench.add_argument("--size", type=int, default=None, help="image side in pixels (default: the model's)")
    bench.add_argument("--batch", type=int, default=None)
    bench.add_argument("--guidance", type=float, default=None)
    bench.add_argument("--repeats", type=int, default=3)
    bench.add_argument("--warmup", type=int, default=1)
    bench.add_argument("--device", default=None, help="cuda or cpu (default: cuda if present)")
    bench.add_argument(
        "--memory-cap", type=float, default=None, metavar="GB", help="pretend the GPU has this much memory"
    )
    bench.add_argument("--no-flops", action="store_true", help="skip counting FLOPs")
    bench.add_argument("--out", default=None, help="append the result records to this JSON-lines file")

    train = commands.add_parser(
        "train-shapes", help="train the embedded shapes model (see labkit.shapes.train)", add_help=False
    )
    train.add_argument("args", nargs=argparse.REMAINDER)

    compare = commands.add_parser(
        "compare", help="is a new run slower or worse than a stored one? (exit 1 if so; chapter 12)"
    )
    from labkit.validate import add_compare_arguments

    add_compare_arguments(compare)

    lab = commands.add_parser("lab", help="execute the chapters and build the book")
    try:
        from labkit.lab import add_lab_arguments
    except ImportError:  # the runner is optional until the book lands
        add_lab_arguments = None
    if add_lab_arguments is not None:
        add_lab_arguments(lab)

    args = parser.parse_args(argv)
    try:
        return _run(args)
    except SourceError as error:  # a source that cannot load here: say what to do, no traceback
        print(f"labkit: {error}", file=sys.stderr)
        return 2


def _run(args) -> int:
    if args.command == "doctor":
        return _doctor(args)
    if args.command == "bench":
        return _bench(args)
    if args.command == "train-shapes":
        from labkit.shapes.train import cli_main

        return cli_main(args.args)
    if args.command == "compare":
        from labkit.validate import compare_command

        return compare_command(args)
    if args.command == "lab":
        from labkit.lab import lab_command

        return lab_command(args)
    return 2


def _doctor(args) -> int:
    from labkit.measure import doctor

    report = doctor()
    if args.json:
        print(json.dumps(report, indent=2, default=str))
        return 0
    for key in (
        "device",
        "gpu_memory_gb",
        "compute_capability",
        "driver",
        "cuda",
        "torch",
        "diffusers",
        "transformers",
        "labkit",
        "python",
    ):
        if key in report:
            print(f"{key:>20}: {report[key]}")
    print("\nSDPA backends:", ", ".join(f"{k}={v}" for k, v in report["sdpa_backends"].items()))
    print(
        "\nsources:",
        f"shapes {report['sources']['shapes']};",
        "twins:",
        ", ".join(report["sources"]["twins"]),
    )
    print("\noptimizations:")
    for name, status in report["optimizations"].items():
        print(f"  {name:24} {status}")
    print("\npresets:")
    for name, problems in report["presets"].items():
        print(
            f"  {name:12} "
            + ("runs fully here" if problems == "ok" else "runs without: " + "; ".join(problems))
        )
    return 0


def _bench(args) -> int:
    from contextlib import nullcontext

    import labkit
    from labkit.measure import append_results, memory_cap, release_memory, results_table

    configurations = [(preset, preset) for preset in args.preset]
    if args.apply:
        configurations.append((args.label or " + ".join(args.apply), args.apply))
    if not configurations:
        configurations = [("baseline", "baseline")]
    records = []
    for label, spec in tqdm(configurations, desc="configurations", unit="config"):
        # a fresh pipeline per configuration: optimizations are not all reversible
        pipe = labkit.load_pipeline(args.model, device=args.device)
        with warnings.catch_warnings(record=True):
            changes = labkit.apply(pipe, spec)
        for change in changes:
            tqdm.write(f"  [{label}] {change}")
        cap = memory_cap(args.memory_cap) if args.memory_cap else nullcontext()
        with cap:
            result = labkit.benchmark(
                pipe,
                steps=args.steps,
                size=args.size,
                batch=args.batch,
                guidance=args.guidance,
                repeats=args.repeats,
                warmup=args.warmup,
                label=label,
                flops=not args.no_flops,
            )
        if args.memory_cap:
            result.record["memory_cap_gb"] = args.memory_cap
        records.append(result.record)
        if args.out:
            append_results(args.out, result.record)
        device = pipe._execution_device
        del pipe
        release_memory(device)
    print(results_table(records).to_string(index=False, float_format=lambda v: f"{v:.3g}"))
    print(f"\ndevice: {records[0]['device']}; {records[0]['size']} px, batch {records[0]['batch']}")
    if args.out:
        print(f"appended {len(records)} record(s) to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
