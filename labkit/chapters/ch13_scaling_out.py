"""Chapter 13, scaling out: one list of prompts across several processes (`labkit.scale`), checked
against one process.

- `gpu_count`, `processes`, `prompts`: what the chapter launches on this profile (one process per GPU
  on a node with two or more, else two CPU processes) and the held-out prompts it generates;
- `run_scenarios`: the launched run (``accelerate launch``, a subprocess) and the same prompts and seeds
  in one process, as measurements of the kind ``scaled_run``: one record per run, with one row per
  image in ``per_image`` (prompt, seed, the process that made it, seconds, a digest of its pixels);
- `order_table`: which process made each image; `same_images`: whether two runs made the same pixels;
- `verdict_rows`: the chapter's verdict, computed from the two records.
"""

from __future__ import annotations

import hashlib
import tempfile
from collections.abc import Sequence

import numpy as np
import torch

from labkit.book import Profile, judge
from labkit.scale import generate_split, images_per_second, run_launched
from labkit.scenarios import Scenario, measurer
from labkit.shapes import data as shapes_data

GUIDANCE = 7.5
"""The guidance of every generation of the chapter (`labkit.scale`'s default)."""


def gpu_count(P: Profile) -> int:
    """The CUDA GPUs the profile's runs can use (0 on a CPU profile)."""
    return torch.cuda.device_count() if str(P.device).startswith("cuda") else 0


def processes(P: Profile) -> tuple[int, bool]:
    """``(processes, on_gpus)``: one process per GPU on a node with two or more, else two CPU processes."""
    gpus = gpu_count(P)
    return (gpus, True) if gpus >= 2 else (2, False)


def prompts(P: Profile) -> list[str]:
    """The prompts of the chapter: ``2 x max(P.batch_sizes)`` held-out prompts of ``shapes``."""
    return shapes_data.heldout(2 * max(P.batch_sizes), seed=0).prompts


def _digest(image: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(image, dtype=np.float32).tobytes()).hexdigest()[:16]


@measurer("scaled_run", pipeline=False)
def _scaled_run(scenario: Scenario, pipe, device) -> dict:
    """`labkit.scale.generate_split` of ``options["prompts"]`` on ``options["processes"]`` processes: more
    than one under ``accelerate launch`` (`labkit.scale.run_launched`, CPU processes when
    ``options["cpu"]``), one in this process (one torch thread on the CPU, as each launched CPU process
    has; this process's thread count is restored afterwards)."""
    options = scenario.options
    call = {"steps": scenario.steps, "guidance": scenario.guidance}
    if options["processes"] > 1:
        with tempfile.TemporaryDirectory(prefix="labkit-scale-") as out:
            images, rows = run_launched(
                out, scenario.source, options["prompts"], processes=options["processes"], cpu=options["cpu"],
                **call,
            )  # fmt: skip
    else:
        threads = torch.get_num_threads()
        try:
            images, rows = generate_split(
                scenario.source, options["prompts"], cpu=options["cpu"], threads=1 if options["cpu"] else None,
                **call,
            )  # fmt: skip
        finally:
            torch.set_num_threads(threads)
    per_image = [row | {"sha256": _digest(image)} for row, image in zip(rows, images, strict=True)]
    return {
        "status": "ok",
        "num_processes": rows[0]["num_processes"],
        "steps": scenario.steps,
        "guidance": scenario.guidance,
        "images_per_s": images_per_second(rows),
        "per_image": per_image,
    }


def run_scenarios(P: Profile) -> list[Scenario]:
    """``[launched, single]``: the `prompts` on `processes` processes, then in this one process, on
    ``P.model`` at ``P.fast_steps`` steps (image ``i`` from seed ``i`` in both)."""
    n, on_gpus = processes(P)
    common = {
        "kind": "scaled_run",
        "source": P.model,
        "steps": P.fast_steps,
        "guidance": GUIDANCE,
        "repeats": 1,
        "warmup": 0,
    }
    options = {"prompts": prompts(P), "cpu": not on_gpus}
    return [
        Scenario(**common, options=options | {"processes": n}, label=f"{n} processes"),
        Scenario(**common, options=options | {"processes": 1}, label="1 process"),
    ]


def order_table(rows: Sequence[dict]):
    """Which process made each image, in prompt order (the ``per_image`` rows of a run's record)."""
    import pandas as pd

    columns = ["index", "prompt", "seed", "process", "num_processes", "device", "seconds"]
    return pd.DataFrame([{c: r.get(c) for c in columns} for r in rows])


def same_images(run: dict, single: dict) -> bool:
    """Whether two runs' records hold the same pixels, image by image in prompt order."""
    a, b = run.get("per_image") or [], single.get("per_image") or []
    return len(a) == len(b) > 0 and all(x["sha256"] == y["sha256"] for x, y in zip(a, b, strict=True))


def verdict_rows(run: dict, single: dict, *, gpus: int) -> list[dict]:
    """The rows of the chapter's verdict, from the records of `run_scenarios`: order kept, images
    independent of the process count, and the speed-up of N processes over one (measurable only with
    one GPU per process)."""
    n = run.get("num_processes", 0)
    if run.get("status") != "ok" or single.get("status") != "ok":
        failed = "; ".join(f"{r['label']}: {r.get('error', r['status'])}" for r in (run, single)
                           if r.get("status") != "ok")  # fmt: skip
        claims = ("images come back in the order of the prompts", f"{n} processes give the images of 1 process",
                  f"{n} GPUs make {n}× the images per second")  # fmt: skip
        return [{"claim": c, "claimed": "", "measured": failed, "verdict": "not measured"} for c in claims]
    records, single_records = run["per_image"], single["per_image"]
    order = [r["index"] for r in records]
    in_order = order == list(range(len(single_records)))
    shares = ", ".join(f"{r['index']}:{r['process']}" for r in records)
    same = same_images(run, single)
    if len(records) != len(single_records):
        difference = f"{len(records)} images against {len(single_records)}"
    else:
        differ = sum(x["sha256"] != y["sha256"] for x, y in zip(records, single_records, strict=True))
        difference = f"{differ} of {len(records)} images differ (digests of their pixels)"
    rows = [
        {
            "claim": "images come back in the order of the prompts",
            "claimed": "index i is prompt i",
            "measured": f"indices {order}; image:process {shares}",
            "verdict": "holds" if in_order else "does not hold",
        },
        {
            "claim": f"{n} processes give the images of 1 process",
            "claimed": "identical",
            "measured": "identical" if same else difference,
            "verdict": "holds" if same else "does not hold",
        },
    ]
    speedup = images_per_second(records) / images_per_second(single_records)
    on_gpus = str(records[0].get("device", "")).startswith("cuda") if records else False
    rows.append(
        {
            "claim": f"{n} GPUs make {n}× the images per second",
            "claimed": f"{n}×",
            "measured": f"{speedup:.2f}× ({n} processes on {records[0].get('device') if records else '-'})",
            "verdict": judge(speedup, n * 0.8, n)
            if on_gpus and gpus >= n
            else "not measurable on this device",
        }
    )
    return rows
