#!/usr/bin/env bash
# The GPU checks in one prepared run, for a machine with one CUDA device.
#
# It runs the tests that have CUDA cases (dropout replay, bf16 autocast, the fp16 loss
# scaler, peak memory from the caching allocator), then benchmarks/step_cost.py on
# vit_ti and vit_b. It needs torch and timm but no data set, and runs from the
# repository root without installing gradreg. Results go to $OUT (default:
# gpu_check_out), one text file per part. Every part has its own time limit, and the
# whole run takes about 7 minutes at most.
#
#     bash benchmarks/gpu_check.sh
set -uo pipefail

out="${OUT:-gpu_check_out}"
mkdir -p "$out"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())" 2>&1 | tee "$out/device.txt"

timeout 150 python3 -m pytest -q -rs -p no:cacheprovider tests/test_memory.py tests/test_compile_amp.py \
    tests/test_regularizer.py 2>&1 | tee "$out/tests.txt"

timeout 120 python3 benchmarks/step_cost.py --model vit_ti --batch-size 128 --repeats 30 2>&1 \
    | tee "$out/step_cost_vit_ti.txt"

timeout 90 python3 benchmarks/step_cost.py --model vit_ti --batch-size 128 --repeats 30 --no-foreach 2>&1 \
    | tee "$out/step_cost_vit_ti_no_foreach.txt"

timeout 60 python3 benchmarks/step_cost.py --model vit_b --batch-size 128 --repeats 10 2>&1 \
    | tee "$out/step_cost_vit_b.txt"
