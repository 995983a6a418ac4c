"""Scaling out: one list of prompts generated across several processes, one per GPU (chapter 13).

`generate_split` runs in every process that ``accelerate launch`` starts. Each process loads the
pipeline on its own device (``PartialState().device``: ``cuda:0``, ``cuda:1``, ... or the CPU), takes its
contiguous share of the prompts with ``PartialState().split_between_processes``, generates each image
with its own seed (so an image does not depend on the number of processes or on which process made
it), and ``accelerate.utils.gather_object`` brings every process's images and records back to all
processes, which put them in the original order. The command line is ``labkit scale`` (`command`)::

    accelerate launch --multi_gpu --num_processes 8 -m labkit.cli scale --source twin:sd15 \\
        --prompt "a red circle" --prompt "a blue square" --steps 20 --out /tmp/scaled  # 8 GPUs

    accelerate launch --multi_gpu --num_processes 2 -m labkit.cli scale --cpu ...  # 2 CPU processes

It writes ``images.npy`` (N, H, W, 3 in prompt order) and ``records.jsonl`` from the main process.
`launch_command` builds such a command, `run_launched` runs it in a subprocess and reads back what it
wrote, `images_per_second` reads a run's speed from its records.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from labkit.models import generate, load_pipeline
from labkit.optimizations import apply


def _state(cpu: bool = False):
    from accelerate import PartialState

    return PartialState(cpu=cpu)


def seeds_for(prompts: Sequence[str], seeds: Sequence[int] | None = None, seed: int = 0) -> list[int]:
    """One seed per prompt: ``seeds`` as given (one per prompt), else ``seed + i`` for prompt ``i``."""
    if seeds is None:
        return [seed + i for i in range(len(prompts))]
    if len(seeds) != len(prompts):
        raise ValueError(f"got {len(seeds)} seeds for {len(prompts)} prompts: give one seed per prompt")
    return [int(s) for s in seeds]


def generate_split(
    source: str,
    prompts: Sequence[str],
    seeds: Sequence[int] | None = None,
    *,
    steps: int = 20,
    guidance: float = 7.5,
    size: int | None = None,
    dtype: str | None = None,
    preset: str | list | None = None,
    cpu: bool = False,
    threads: int | None = None,
) -> tuple[np.ndarray, list[dict]]:
    """Generate one image per prompt, split across the launched processes; gather them in order.

    Call it in every process (``accelerate launch``); in a plain ``python`` process it is the
    single-process run. Image ``i`` uses seed ``seeds[i]`` (default ``i``) on a CPU generator, batch 1,
    so the images do not depend on the number of processes. ``preset`` is applied with
    `labkit.apply` in each process. Returns, in every process, the images (N, H, W, 3, float in [0, 1])
    and one record per image (prompt, seed, the process that made it, seconds, device), in prompt order.
    """
    from accelerate.utils import gather_object

    if not prompts:
        raise ValueError("no prompts: give at least one")
    seeds = seeds_for(prompts, seeds)
    if threads:
        torch.set_num_threads(threads)
    state = _state(cpu)
    # the CPU as "cpu", not the "cpu:0" a launched CPU process gets: diffusers computes with "cpu:0"
    # in a slightly different way (images differ by about 1e-5), and they should not depend on that
    device = "cpu" if state.device.type == "cpu" else state.device
    pipe = load_pipeline(source, device=device, dtype=dtype)
    if preset is not None:
        apply(pipe, preset)
    pipe.set_progress_bar_config(disable=True)
    jobs = list(enumerate(zip(prompts, seeds, strict=True)))
    mine = []
    with state.split_between_processes(jobs) as share:
        for index, (prompt, seed) in share:
            start = time.perf_counter()
            image = generate(pipe, [prompt], steps=steps, guidance=guidance, size=size, seed=seed)
            record = {
                "index": index,
                "prompt": prompt,
                "seed": seed,
                "process": state.process_index,
                "num_processes": state.num_processes,
                "device": str(device),
                "source": source,
                "steps": steps,
                "guidance": guidance,
                "seconds": time.perf_counter() - start,
            }
            mine.append((index, np.asarray(image[0], dtype=np.float32), record))
    gathered = gather_object(mine) if state.num_processes > 1 else mine
    gathered = sorted(gathered, key=lambda item: item[0])
    if [item[0] for item in gathered] != list(range(len(prompts))):
        raise RuntimeError("the gathered images do not cover every prompt exactly once")
    return np.stack([item[1] for item in gathered]), [item[2] for item in gathered]


def save(out: str | os.PathLike, images: np.ndarray, records: Sequence[dict]) -> Path:
    """Write ``images.npy`` and ``records.jsonl`` into folder ``out`` (what ``labkit scale`` writes)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / "images.npy", images)
    (out / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return out


def launch_command(
    args: Sequence[str], *, processes: int = 2, cpu: bool = True, port: int | None = None
) -> list[str]:
    """The ``accelerate launch`` command that runs ``labkit scale ARGS`` on ``processes`` processes, one
    per GPU, or on the CPU when ``cpu``.

    With accelerate 1.x, ``accelerate launch --cpu --num_processes 2`` starts *one* process (its
    multi-CPU launch goes through ``mpirun`` and a hostfile). Several CPU processes come from the same
    launcher as several GPUs, ``--multi_gpu`` (torchrun underneath), with ``--cpu`` passed to our
    command instead: ``PartialState(cpu=True)`` then joins a gloo process group on the CPU.
    """
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(processes)]
    command += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    if processes > 1:
        command += ["--multi_gpu"]
    if cpu:
        command += ["--num_cpu_threads_per_process", "1"]
        args = [*args, "--cpu"] if "--cpu" not in args else list(args)
    if port is not None:
        command += ["--main_process_port", str(port)]
    return [*command, "-m", "labkit.cli", "scale", *args]


def free_port() -> int:
    """A free TCP port on this machine, for the processes' rendezvous."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_launched(
    out: str | os.PathLike,
    source: str,
    prompts: Sequence[str],
    seeds: Sequence[int] | None = None,
    *,
    processes: int = 2,
    cpu: bool = True,
    steps: int = 20,
    guidance: float = 7.5,
    timeout: float = 600,
) -> tuple[np.ndarray, list[dict]]:
    """Run `generate_split` under ``accelerate launch`` in a subprocess and read back what it wrote.

    Spawns ``processes`` processes (chapter 13 and the tests use it with 2 CPU processes). Raises
    with the launched command's output when it fails.
    """
    import subprocess

    args = ["--source", source, "--steps", str(steps), "--guidance", str(guidance), "--out", str(out)]
    for prompt in prompts:
        args += ["--prompt", prompt]
    for seed in seeds or []:
        args += ["--seed", str(seed)]
    if cpu:
        args += ["--threads", "1"]
    command = launch_command(args, processes=processes, cpu=cpu, port=free_port())
    env = os.environ | {"TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
    if done.returncode != 0:
        raise RuntimeError(
            f"accelerate launch failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        )
    out = Path(out)
    records = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines() if line]
    return np.load(out / "images.npy"), records


def images_per_second(records: Sequence[dict]) -> float:
    """Images per second of a run from its records: the images over the busiest process's seconds
    (the processes run side by side, so the slowest one sets the wall time; loading excluded)."""
    busy: dict[int, float] = {}
    for r in records:
        busy[r["process"]] = busy.get(r["process"], 0.0) + r["seconds"]
    return len(records) / max(busy.values())


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of ``labkit scale`` (wired into `labkit.cli`)."""
    parser.add_argument("--source", default="shapes", help="shapes, twin:NAME, a folder or hub id")
    parser.add_argument("--prompt", action="append", required=True, help="a prompt (repeat the flag)")
    parser.add_argument("--seed", action="append", type=int, help="one per prompt (default: 0, 1, ...)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--size", type=int, default=None)
    parser.add_argument("--dtype", default=None, help="float16, bfloat16 or float32 (default)")
    parser.add_argument("--preset", default=None, help="a labkit preset applied in each process")
    parser.add_argument("--cpu", action="store_true", help="run on the CPU even if GPUs are visible")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per process")
    parser.add_argument("--out", required=True, help="folder for images.npy and records.jsonl")


def command(args: argparse.Namespace) -> int:
    """``labkit scale`` (under ``accelerate launch``): generate, gather, save on the main process."""
    images, records = generate_split(
        args.source, args.prompt, args.seed, steps=args.steps, guidance=args.guidance, size=args.size,
        dtype=args.dtype, preset=args.preset, cpu=args.cpu, threads=args.threads,
    )  # fmt: skip
    state = _state(args.cpu)
    if state.is_main_process:
        save(args.out, images, records)
        print(f"{len(records)} images from {state.num_processes} process(es) -> {args.out}")
    state.wait_for_everyone()
    return 0
