"""The labkit command: one entry point, one subcommand per job, each with --help.

    labkit doctor                                   what this machine can run, and why not
    labkit bench --model twin:sd15 --preset baseline --preset tier1 --out results.jsonl
    labkit bench --model shapes --apply dpm_solver:steps=20 fp16 --label mine
    labkit compare base.jsonl new.jsonl --time-tolerance 0.1   exit 1 if new is slower or worse
    labkit evaluate --model shapes --sampler "DPM++ 2M:20"   prompt accuracy and FID on shapes
    labkit lab --profile ci                         execute the chapters and build the book
    labkit scale --prompt P --out DIR               (under accelerate launch) prompts across processes
    labkit train shapes --preset cpu                train the shapes model (and its variants)

Every argument is checked before any model loads: a bad one exits 2 with the valid range.
"""

from __future__ import annotations

import argparse
import json
import math
import sys

from labkit.records import RecordsError, check_writable


def _bounded_int(low: int, what: str = ""):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number (>= {low}{what})") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{value} is out of range: give a whole number >= {low}{what}")
        return value

    return parse


def _size(text: str) -> int:
    value = _bounded_int(8, ", a multiple of 8")(text)
    if value % 8:
        raise argparse.ArgumentTypeError(
            f"{value} is not a multiple of 8 (the VAE downsamples by 8): try {value // 8 * 8 or 8}"
        )
    return value


def _nonnegative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"{text} is out of range: give a finite number >= 0")
    return value


def _positive_float(text: str) -> float:
    value = _nonnegative_float(text)
    if value == 0:
        raise argparse.ArgumentTypeError("0 is out of range: give a number > 0")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The ``labkit`` argument parser, all subcommands included."""
    from labkit.compare import add_compare_arguments
    from labkit.runner import add_lab_arguments
    from labkit.scale import add_arguments as add_scale_arguments

    parser = argparse.ArgumentParser(
        prog="labkit", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    doctor = commands.add_parser("doctor", help="hardware, versions, and what can run here (and why not)")
    doctor.add_argument("--json", action="store_true", help="print the report as JSON")
    doctor.add_argument("--source", action="append", default=None, metavar="SOURCE",
                        help="check the optimizations against this source (default: shapes and twin:sd15)")  # fmt: skip

    bench = commands.add_parser("bench", help="benchmark presets or optimizations and append records")
    bench.add_argument(
        "--model", default="shapes", help="shapes | shapes:VARIANT | twin:NAME | a folder | a hub id"
    )
    bench.add_argument("--preset", action="append", default=[], help="a preset (repeat to compare several)")
    bench.add_argument("--apply", nargs="+", default=None, metavar="OPT",
                       help="optimizations instead of a preset, e.g. dpm_solver:steps=20 fp16 torch_compile:mode=reduce-overhead")  # fmt: skip
    bench.add_argument("--label", default=None, help="label of the --apply configuration")
    bench.add_argument("--dtype", default="float32", help="precision to load in: float32, float16, bfloat16")
    bench.add_argument("--steps", type=_bounded_int(1), default=None, help="denoising steps (>= 1)")
    bench.add_argument("--size", type=_size, default=None, help="image side in pixels (default: the model's)")
    bench.add_argument("--batch", type=_bounded_int(1), default=1, help="images per call (>= 1)")
    bench.add_argument("--guidance", type=_nonnegative_float, default=None, help="guidance scale (>= 0)")
    bench.add_argument("--repeats", type=_bounded_int(1), default=3, help="timed calls (>= 1)")
    bench.add_argument("--warmup", type=_bounded_int(0), default=1, help="untimed warm-up calls (>= 0)")
    bench.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if present)")
    bench.add_argument("--memory-cap", type=_positive_float, default=None, metavar="GB",
                       help="pretend the GPU has this much memory (needs a CUDA GPU)")  # fmt: skip
    bench.add_argument("--no-flops", action="store_true", help="skip counting FLOPs")
    bench.add_argument("--out", default=None, help="append the records to this JSON-lines file")

    compare = commands.add_parser(
        "compare", help="is a new run slower or worse than a stored one? (exit 1 if so)"
    )
    add_compare_arguments(compare)

    evaluate = commands.add_parser(
        "evaluate", help="prompt accuracy and FID of a shapes model under samplers"
    )
    evaluate.add_argument(
        "--model", default="shapes", help="shapes, shapes:VARIANT or a shapes-format folder"
    )
    evaluate.add_argument("--sampler", action="append", default=None, metavar="NAME:STEPS",
                          help='a sampler and its steps, e.g. "DPM++ 2M:20" (repeat; default: DPM++ 2M:20, DDIM:50, PNDM:50)')  # fmt: skip
    evaluate.add_argument(
        "--apply", nargs="+", default=(), metavar="OPT", help="optimizations to apply first"
    )
    evaluate.add_argument("--n", type=_bounded_int(1), default=500, help="held-out prompts (>= 1)")
    evaluate.add_argument("--guidance", type=_nonnegative_float, default=None)
    evaluate.add_argument("--device", default=None)
    evaluate.add_argument(
        "--store", default=None, metavar="DIR", help="a records store to keep the records in"
    )

    lab = commands.add_parser("lab", help="execute the chapters and build the book")
    add_lab_arguments(lab)

    scale = commands.add_parser(
        "scale", help="prompts split across processes, one per GPU (run it under accelerate launch)"
    )
    add_scale_arguments(scale)

    train = commands.add_parser("train", help="train the shapes model, its classifier or a variant")
    _add_train(train)
    return parser


def _add_train(parser: argparse.ArgumentParser) -> None:
    """``labkit train WHAT ...``: the trainers of `labkit.training`, each with its own options."""
    from labkit.training import TRAINERS

    jobs = parser.add_subparsers(dest="job", required=True, metavar="WHAT")
    for name, trainer in TRAINERS.items():
        trainer.add_arguments(jobs.add_parser(name, help=trainer.help, description=trainer.help))


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from labkit.models import SourceError

    try:
        return COMMANDS[args.command](args)
    except (SourceError, RecordsError, ValueError) as error:  # bad input: say what to do, no traceback
        print(f"labkit {args.command}: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"labkit {args.command}: interrupted (everything measured so far is kept)", file=sys.stderr)
        return 130


def _doctor(args) -> int:
    from labkit.doctor import doctor

    report = doctor(tuple(args.source) if args.source else ("shapes", "twin:sd15"))
    if args.json:
        print(json.dumps(report, indent=2, default=str))
        return 0
    keys = (
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
    )
    for key in keys:
        if key in report:
            print(f"{key:>20}: {report[key]}")
    print("\nPyTorch SDPA kernels:", ", ".join(f"{k}: {v}" for k, v in report["sdpa_backends"].items()))
    sources = report["sources"]
    print(f"\nsources: shapes {sources['shapes']}; variants: {', '.join(sources['shapes variants'])}")
    print(f"         twins: {', '.join(sources['twins'])}")
    for key, value in report.items():
        if key.startswith("optimizations on "):
            print(f"\n{key}:")
            for name, status in value.items():
                print(f"  {name:24} {status}")
        elif key.startswith("presets on "):
            print(f"\n{key}:")
            for name, problems in value.items():
                print(
                    f"  {name:12} "
                    + ("runs fully here" if problems == "ok" else "runs without: " + "; ".join(problems))
                )
    return 0


def _bench(args) -> int:
    from tqdm import tqdm

    from labkit.book import records_table
    from labkit.devices import cap_problem, resolve_device
    from labkit.optimizations import check_steps
    from labkit.records import append_records
    from labkit.scenarios import Scenario, check, measure

    device = resolve_device(args.device)
    if (problem := cap_problem(args.memory_cap, device)) is not None:
        raise ValueError(problem)
    common = dict(
        kind="generate", source=args.model, dtype=args.dtype, size=args.size, steps=args.steps,
        batch=args.batch, guidance=args.guidance, repeats=args.repeats, warmup=args.warmup,
        flops=not args.no_flops, memory_cap_gb=args.memory_cap,
    )  # fmt: skip
    scenarios = [_preset_scenario(preset, args, device, common) for preset in args.preset]
    if args.apply:
        label = args.label or " + ".join(args.apply)
        scenarios.append(Scenario(optimizations=tuple(check_steps(args.apply)), label=label, **common))
    if not scenarios:
        scenarios = [_preset_scenario("baseline", args, device, common)]
    for scenario in scenarios:  # every name and number, before anything loads
        check(scenario)
    if args.out:
        check_writable(args.out)
    records = []
    for scenario in tqdm(scenarios, desc="configurations", unit="config"):
        (record,) = measure([scenario], device=device, progress=False, say=None)
        records.append(record)
        for line in record.get("applied", []) + record.get("unavailable", []):
            tqdm.write(f"  [{record['label']}] {line}")
        if record["status"] != "ok":
            tqdm.write(
                f"  [{record['label']}] {record['status']}: {record.get('reason') or record.get('error', '')}"
            )
        if args.out:
            append_records(args.out, record)
    print(records_table(records).to_string(index=False, float_format=lambda v: f"{v:.3g}"))
    print(f"\ndevice: {records[0]['device']}; {records[0].get('size')} px, batch {records[0].get('batch')}")
    if args.out:
        print(f"appended {len(records)} record(s) to {args.out}")
    return 0


def _preset_scenario(preset: str, args, device, common: dict):
    """A preset as far as it runs here: the steps that cannot (a CUDA-only step on a CPU, a tuned VAE that
    a twin does not ship) are left out, named in the label and listed with their reason in the record;
    the preset's call settings apply where the command line sets none."""
    from labkit.optimizations import OPTIMIZATIONS, PRESETS, check_steps, step_problem
    from labkit.scenarios import Scenario

    kept, dropped = [], []
    for name, options in check_steps(preset):
        problem = step_problem(name, source=args.model, options=options)
        if problem is None and "cuda" in OPTIMIZATIONS[name].needs and device.type != "cuda":
            problem = f"needs a CUDA GPU; this run is on {device}"
        if problem is None:
            kept.append((name, options))
        else:
            dropped.append(f"{name}: {problem}")
    fields = dict(common)
    defaults = {"steps": None, "size": None, "batch": 1, "guidance": None}
    for key, value in PRESETS[preset].call.items():
        if getattr(args, key) == defaults[key]:
            fields[key] = value
    names = [d.split(":")[0] for d in dropped]
    label = preset + (f" (without {', '.join(names)})" if names else "")
    return Scenario(
        optimizations=tuple(kept), label=label, notes={"preset": preset, "unavailable": dropped}, **fields
    )


def _evaluate(args) -> int:
    from labkit.optimizations import SAMPLERS, check_steps
    from labkit.optimizations.samplers import sampler_step
    from labkit.scenarios import Scenario, check, measure

    samplers = []
    for text in args.sampler or ["DPM++ 2M:20", "DDIM:50", "PNDM:50"]:
        name, _, steps = text.rpartition(":")
        if name not in SAMPLERS or not steps.isdigit() or int(steps) < 1:
            raise ValueError(
                f"--sampler {text!r}: give NAME:STEPS with NAME one of {', '.join(SAMPLERS)} and STEPS >= 1"
            )
        samplers.append((name, int(steps)))
    extra = tuple(check_steps(list(args.apply)))
    scenarios = [
        Scenario(
            kind="quality",
            source=args.model,
            optimizations=(*extra, sampler_step(name, steps)),
            steps=steps,
            guidance=args.guidance,
            n=args.n,
            label=f"{name} {steps}",
            notes={"sampler": name},
        )  # fmt: skip
        for name, steps in samplers
    ]
    for scenario in scenarios:
        check(scenario)
    for record in measure(scenarios, args.store, device=args.device):
        if record["status"] not in ("ok", "nan"):
            print(f"{record['label']:>20}  {record['status']}: {record.get('reason') or record.get('error')}")
            continue
        acc = record["accuracy"]
        print(
            f"{record['label']:>20}  prompt accuracy {record['prompt_accuracy']:.3f} (n={record['n']}; shape "
            f"{acc['shape']:.3f} color {acc['color']:.3f} position {acc['position']:.3f} size {acc['size']:.3f})"
            f"  FID {record['fid']:.2f}"
        )
    return 0


def _lab(args) -> int:
    from labkit.runner import lab_command

    return lab_command(args)


def _train(args) -> int:
    from labkit.training import TRAINERS

    return TRAINERS[args.job].run(args)


def _compare(args) -> int:
    from labkit.compare import compare_command

    return compare_command(args)


def _scale(args) -> int:
    from labkit.scale import command

    return command(args)


COMMANDS = {
    "doctor": _doctor,
    "bench": _bench,
    "compare": _compare,
    "evaluate": _evaluate,
    "lab": _lab,
    "scale": _scale,
    "train": _train,
}


if __name__ == "__main__":
    sys.exit(main())
