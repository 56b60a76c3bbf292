#!/usr/bin/env bash
# The checks to run when a CUDA machine is at hand, as one prepared command (aimed at under
# ten minutes on one GPU):
#   1. parity with diffusers on the GPU, in float32 and in float16: txt2img with every
#      sampler (SD1 and SD2-v), img2img and inpainting, ControlNet (tests/test_pipeline_parity.py,
#      test_editing_parity.py, test_controlnet_pipeline.py with LDM_TEST_DEVICE / LDM_TEST_DTYPE),
#      and the seamless VAE with its activations kept in CPU memory, alone and as the memory
#      runner plans it, offloaded too (test_seamless_vae.py);
#   2. the GPU bench: scripts/bench.py --device cuda (float16, 512x512, ldm against diffusers:
#      U-Net steps per second for 1 and 4 images, a 20-step image, peak CUDA memory);
#   3. with the time left of TOTAL_SECONDS (default 570, under the device's 10 minutes a
#      command), both U-Nets through torch.compile in reduce-overhead mode (CUDA graphs, as
#      diffusers documents for its U-Net) against eager: scripts/bench.py --unet-only --compile.
#
#   bash scripts/gpu_check.sh          # from the repository root; logs and results in $OUT
#   DEVICE=cpu PY=.venv/bin/python PARITY_SECONDS=900 BENCH_SECONDS=900 BENCH_ARGS="--short --dtypes float32" \
#       TOTAL_SECONDS=3000 COMPILE_ARGS="--size 64 --repeats 2 --dtypes float32" \
#       OUT=/tmp/gpu-check bash scripts/gpu_check.sh     # the same steps on the CPU (a check of this script)
#
# A machine that has torch but not the other packages takes them as wheels in .whl/ (made
# where pip can reach the registry, the versions of the venv):
#   python -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl diffusers==0.42.1 \
#     transformers==5.25.0 tokenizers==0.23.3 huggingface_hub==2.4.0 open_clip_torch==3.3.0 \
#     ftfy==6.3.1 wcwidth==0.9.4 importlib_metadata==10.2.0
# Everything stays offline: the models are the tests' tiny random ones and the bench's
# random-weight SD1.5 folder, built on the spot.
# Nothing here reads weights/: where the checkout must travel to the GPU machine under a size
# limit, the shipped models (about 80 MB of weights/*.safetensors) can stay behind.
set -u
OUT=${OUT:-.cache/gpu-check}
PY=${PY:-python3}
DEVICE=${DEVICE:-cuda}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/ldm-site \
        .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/ldm-site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-}

{
    nvidia-smi || true
    "$PY" -c "import torch, diffusers, transformers; print('torch', torch.__version__, 'diffusers', \
diffusers.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name(0) \
if torch.cuda.is_available() else 'no CUDA device')"
} 2>&1 | tee "$OUT/machine.txt"

failed=0
for dtype in float32 float16; do
    LDM_TEST_DEVICE=$DEVICE LDM_TEST_DTYPE=$dtype timeout "${PARITY_SECONDS:-150}" "$PY" -m pytest -q \
        -p no:cacheprovider tests/test_pipeline_parity.py tests/test_editing_parity.py \
        tests/test_controlnet_pipeline.py tests/test_seamless_vae.py >"$OUT/parity-$dtype.log" 2>&1 \
        || failed=1
    echo "parity on $DEVICE in $dtype:"; tail -n 3 "$OUT/parity-$dtype.log"
done
# BENCH_ARGS: more bench options (e.g. "--compile" for diffusers' and ldm's compiled rows).
timeout "${BENCH_SECONDS:-270}" "$PY" scripts/bench.py --device "$DEVICE" --out "$OUT/bench" ${BENCH_ARGS:-} \
    >"$OUT/bench.log" 2>&1 || failed=1
tail -n 40 "$OUT/bench.log"
left=$(( ${TOTAL_SECONDS:-570} - SECONDS ))
if [ "$left" -ge 60 ]; then
    timeout "$left" "$PY" scripts/bench.py --device "$DEVICE" --unet-only --compile --repeats 10 \
        ${COMPILE_ARGS:-} >"$OUT/compiled.log" 2>&1 || failed=1
    echo "compiled U-Nets on $DEVICE (within ${left} s):"; tail -n 4 "$OUT/compiled.log"
else
    echo "compiled U-Nets skipped: ${left} s left of TOTAL_SECONDS"
fi
exit $failed
