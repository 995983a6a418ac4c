#!/usr/bin/env bash
# Download here, once, the wheels the GPU machine lacks (it has torch, transformers, accelerate,
# torchmetrics, pandas, matplotlib, but not diffusers, torchao, papermill, nbval, ipykernel), for its
# Python 3.12 on x86-64, into .whl/ (git-ignored). The device call then carries .whl (see run.sh).
set -euo pipefail
cd "$(dirname "$0")/../.."
mkdir -p .whl
platforms=()
for tag in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$tag")
done
python3 -m pip download -q --only-binary=:all: --python-version 3.12 --implementation cp "${platforms[@]}" \
  -d .whl "diffusers==0.42.1" "torchao==0.18.0" papermill nbval ipykernel
# Drop what the GPU image already has (its package list: /work/.library/device/KINDS.md); pip there
# resolves against those, so only the missing ones are installed.
have="accelerate aiohappyeyeballs aiohttp aiosignal annotated_doc anyio attrs certifi charset_normalizer click
colorama contourpy coverage cycler filelock fonttools frozenlist fsspec h11 hf_xet httpcore httpx huggingface_hub
idna iniconfig jinja2 joblib kiwisolver markdown_it_py markupsafe matplotlib mdurl mpmath multidict networkx numpy
packaging pandas pillow pluggy propcache protobuf psutil pygments pyparsing pytest python_dateutil pyyaml regex
requests rich safetensors setuptools six sympy tokenizers torch torchmetrics tqdm transformers triton
typing_extensions urllib3 wheel yarl zipp"
for name in $have; do
  find .whl -maxdepth 1 -iname "${name}-*.whl" -delete
done
du -sh .whl && ls .whl
