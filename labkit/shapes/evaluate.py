"""Score a shapes pipeline under several samplers: prompt accuracy and FID on held-out prompts.

    python -m labkit.shapes.evaluate                       # the shipped model, 500 held-out prompts
    python -m labkit.shapes.evaluate --model runs/shapes/model --n 200 --samplers dpm++:20
    python -m labkit.shapes.evaluate --model shapes:vpred --samplers dpm++:20,ddim:50   # a shipped variant
    python -m labkit.shapes.evaluate --unet labkit/shapes/variants/student --samplers dpm++:20

Each row uses the same held-out prompts and per-image seeds (:func:`labkit.quality.evaluate`). Used to
write the numbers in ``labkit/shapes/README.md`` and in the samplers chapter.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

# sampler name -> the labkit.tiers optimization that sets it (one way to swap a scheduler)
SAMPLERS = {"pndm": "pndm", "ddim": "ddim", "dpm++": "dpm_solver", "euler": "euler", "ddpm": "ddpm"}


def set_sampler(pipe, name: str) -> None:
    """Swap the pipeline's scheduler for ``name`` (a key of ``SAMPLERS``), keeping the trained config."""
    from labkit import tiers

    tiers.OPTIMIZATIONS[SAMPLERS[name]].fn(pipe)


def evaluate_samplers(
    pipe, samplers: list[tuple[str, int]], n: int = 500, guidance: float | None = None, seed: int = 0
) -> list[dict]:
    """One :func:`labkit.quality.evaluate` row per (sampler, steps). Used in the samplers chapter."""
    from .. import quality

    rows = []
    for name, steps in samplers:
        set_sampler(pipe, name)
        kwargs = {} if guidance is None else {"guidance": guidance}
        result = quality.evaluate(pipe, n=n, steps=steps, seed=seed, **kwargs)
        result["sampler"] = name
        rows.append(result)
    return rows


def main(argv: list[str] | None = None) -> int:
    import torch

    from labkit.models import load_pipeline

    from . import MODEL_DIR

    p = argparse.ArgumentParser(prog="python -m labkit.shapes.evaluate", description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(MODEL_DIR), help="a folder, or a source such as shapes:vpred")
    p.add_argument("--n", type=int, default=500)
    p.add_argument("--samplers", default="dpm++:20,ddim:50,pndm:50,ddpm:250", help="name:steps,...")
    p.add_argument("--guidance", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", default=None, help="also write the rows here (JSON lines)")
    p.add_argument(
        "--unet", default=None, help="a UNet folder to score in the model's place (the distilled student)"
    )
    args = p.parse_args(argv)

    pipe = load_pipeline(args.model, device=args.device)
    if args.unet:  # e.g. labkit/shapes/variants/student (the distillation chapter)
        from labkit import tiers

        tiers.distilled_student(pipe, unet=args.unet)
    pipe.set_progress_bar_config(disable=True)
    samplers = [(s.split(":")[0], int(s.split(":")[1])) for s in args.samplers.split(",")]
    rows = []
    for name, steps in samplers:
        start = time.perf_counter()
        (row,) = evaluate_samplers(pipe, [(name, steps)], n=args.n, guidance=args.guidance, seed=args.seed)
        row["device"] = args.device
        row["unet"] = args.unet or "the model's"
        row["torch"] = torch.__version__
        rows.append(row)
        acc = row["accuracy"]
        print(
            f"{name:>6} {steps:>4} steps  guidance {row['guidance']}  prompt accuracy {row['prompt_accuracy']:.3f}"
            f"  (shape {acc['shape']:.3f} color {acc['color']:.3f} position {acc['position']:.3f}"
            f" size {acc['size']:.3f})  FID {row['fid']:.2f}  [{time.perf_counter() - start:.0f} s]",
            flush=True,
        )
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
