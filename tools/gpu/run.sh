#!/usr/bin/env bash
# The GPU jobs of the lab, each one command on the device machine (run from the repository root):
#
#   bash tools/gpu/run.sh anchors       the SD 1.5 anchor configurations, eager (~6 min on an H100)
#   bash tools/gpu/run.sh compiled      their torch.compile rows (~8 min: each compiles)
#   bash tools/gpu/run.sh train-shapes  train the embedded shapes model (labkit train shapes, gpu preset, <= 10 min)
#   bash tools/gpu/run.sh train-variants  the tier-3 variants on the shipped model: v-prediction (08), student (09),
#                                       QAT (07), a few minutes each; copy $OUT/variants/* into labkit/shapes/variants/
#   bash tools/gpu/run.sh lab [N ...]   execute chapters N ... (default: all) with the gpu profile, publish into book/
#                                       (one call runs at most 10 minutes: give a few chapters per call)
#
# Before the first device call, here: `bash tools/gpu/wheels.sh` (fills .whl/). The device call then is
#   run(command="bash tools/gpu/run.sh anchors", carry=[".whl"])
# Results and logs go to $OUT (the device tool brings them back); copy them into the repository.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-runs/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1

# Install the carried wheels into a venv that sees the image's packages, so only the missing ones install.
python3 -m venv --system-site-packages /tmp/labkit-venv
/tmp/labkit-venv/bin/python -m pip install -q --no-index --find-links .whl "diffusers==0.42.1" torchao papermill nbval ipykernel
/tmp/labkit-venv/bin/python -m pip install -q --no-index --no-deps --no-build-isolation -e . 2>/dev/null \
  || export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PATH="/tmp/labkit-venv/bin:$PATH"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
python -m labkit.cli doctor | tee "$OUT/doctor.txt"

bench() { python -m labkit.cli bench --model twin:sd15 --size 512 --repeats 5 --out "$OUT/anchors.jsonl" "$@"; }

case "${1:?which job? anchors | compiled | train-shapes | train-variants | lab}" in
  anchors)
    bench --preset baseline
    bench --apply pndm sdpa --label "fp32, SDPA, PNDM 50"
    bench --apply ddim fp16 sdpa --label "fp16, SDPA, DDIM 50"
    bench --preset tier1 --label "fp16, SDPA, DPM-Solver++ 20"
    bench --apply dpm_solver fp16 sdpa attention_slicing --label "+ attention slicing"
    bench --apply dpm_solver fp16 sdpa model_cpu_offload --label "model CPU offload"
    bench --apply dpm_solver fp16 sdpa sequential_cpu_offload --repeats 3 --label "sequential CPU offload"
    bench --preset tier1 --batch 16 --repeats 3 --label "fp16, SDPA, DPM-Solver++ 20, batch 16"
    ;;
  compiled)
    bench --apply dpm_solver fp16 sdpa torch_compile --label "+ torch.compile default"
    bench --apply dpm_solver fp16 sdpa torch_compile:mode=reduce-overhead --label "+ torch.compile reduce-overhead"
    bench --apply dpm_solver fp16 sdpa fuse_qkv channels_last torch_compile:mode=reduce-overhead,vae=true \
      --label "+ fused QKV, channels_last, compiled UNet and VAE decode"
    ;;
  train-shapes)
    python -m labkit.cli train shapes --preset gpu --device cuda --out "$OUT/shapes-gpu" 2>&1 | tee "$OUT/train.log"
    ;;
  train-variants)
    V="$OUT/variants"; mkdir -p "$V"
    python -m labkit.cli train vpred --preset gpu --device cuda --out "$OUT/vpred-gpu" --export "$V/vpred" \
      2>&1 | tee "$OUT/vpred.log"
    python -m labkit.cli train student --preset gpu --device cuda --out "$OUT/student-gpu" --export "$V/student" \
      2>&1 | tee "$OUT/student.log"
    python -m labkit.cli train qat --preset gpu --device cuda --out "$OUT/qat-gpu" --export "$V/qat" 2>&1 | tee "$OUT/qat.log"
    ;;
  lab)
    shift
    python -m labkit.cli lab --profile gpu --publish --force --no-build ${1:+--chapters "$@"} 2>&1 | tee "$OUT/lab.log"
    tar -czf "$OUT/book-executed.tar.gz" book/chapters book/records book/lab-manifest.json
    ;;
  *) echo "unknown job $1" >&2; exit 2 ;;
esac
echo "results in $OUT"
