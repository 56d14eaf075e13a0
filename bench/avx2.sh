#!/usr/bin/env bash
# Run a command as an AVX2-only CPU would run it, on an AVX-512 CPU: every kernel library torch uses is limited
# to AVX2 (torch's own kernels, oneDNN, MKL and FBGEMM's int8 kernels), so bf16 matmuls are emulated as on an
# AMD Zen 2/3 or most Intel client chips, and fp32/int8 use AVX2 code. The hardware is still the host's (its
# clock, caches and cores), so figures are "AVX2 kernels on <host CPU>", not a Zen 3; describe_cpu() says so.
#
#   bash bench/avx2.sh .venv/bin/python bench/int8.py --threads 1
#   bash bench/avx2.sh .venv/bin/protlm demo -o runs/demo-avx2
set -euo pipefail
export ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 DNNL_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 \
       FBGEMM_ENABLE_INSTRUCTIONS=AVX2
exec "$@"
