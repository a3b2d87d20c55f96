#!/usr/bin/env bash
# Bring TensorRT-RTX to the GPU machine in parts (UNTESTED on the GPU machine: written and rehearsed on CPU only).
#
# The device tool carries at most 64 MiB per call (working tree included), and tensorrt-rtx's libs wheel is ~95 MB
# (it does not compress further: a wheel is a zip). A warm machine keeps its files between calls that follow each
# other within ~30 s, so: split the wheels here into parts of <= 50 MiB, carry one part per call into a folder that
# persists on the machine (/tmp/trt-parts), and in the last call join, check the sha256s and install with
# `pip install --no-index --no-deps --target`.
#
#   bash bench/gpu/trt_rtx_parts.sh download .trt            # here: pip download the cp312 manylinux wheels
#   bash bench/gpu/trt_rtx_parts.sh split .trt               # here: .trt/*.whl -> .trt/*.whl.partNN + manifest
#   bash bench/gpu/trt_rtx_parts.sh install DIR SITE         # there: join DIR's parts, verify, install into SITE
#
# Plan of the device calls (each names the part in `carry`; .trt/ is listed in .git/info/exclude):
#   call 1: carry [.trt/A.part00]  command: mkdir -p /tmp/trt-parts && cp .trt/* /tmp/trt-parts/
#   call 2: carry [.trt/A.part01, .trt/B.whl.part00, .trt/manifest.sha256, ...] command:
#           cp .trt/* /tmp/trt-parts/ && bash bench/gpu/trt_rtx_parts.sh install /tmp/trt-parts /tmp/trt-site \
#           && PYTHONPATH=/tmp/trt-site bash bench/gpu.sh
# TensorRT-RTX targets Ampere-and-newer RTX/SM80-class GPUs; whether its engines run on the H200 (SM 9.0) is
# exactly what the last call finds out: gpu.sh's tensorrt step reports the error if they do not.
set -euo pipefail
PART_SIZE=${PART_SIZE:-50M}
VERSION=${TRT_RTX_VERSION:-1.7.1.116}
cmd=${1:-}; dir=${2:-.trt}
case "$cmd" in
  download)
    mkdir -p "$dir"
    for pkg in tensorrt-rtx tensorrt-rtx-cu13 tensorrt-rtx-cu13-bindings tensorrt-rtx-cu13-libs; do
      python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d "$dir" "$pkg==$VERSION" || python3 -m pip download --no-deps -d "$dir" "$pkg==$VERSION"
    done
    # fp16 engines need the ONNX converted first (permsparse.runtime.precision): onnxconverter-common is pure Python
    python3 -m pip download --no-deps -d "$dir" "onnxconverter-common==1.16.0" ;;
  split)
    cd "$dir"
    : > manifest.sha256
    for w in *.whl; do
      sha256sum "$w" >> manifest.sha256
      split -b "$PART_SIZE" -d -a 2 "$w" "$w.part"   # a small wheel gives one part, part00
      rm "$w"
    done
    ls -l ;;
  install)
    site=${3:?usage: install DIR SITE}
    cd "$dir"
    for first in *.whl.part00; do
      w=${first%.part00}
      cat "$w".part[0-9][0-9] > "$w"
    done
    sha256sum -c manifest.sha256
    python3 -m pip install -q --no-index --no-deps --no-compile --target "$site" ./*.whl
    PYTHONPATH="$site" python3 -c "import tensorrt_rtx as t; print('tensorrt_rtx', t.__version__)" ;;
  *) sed -n '2,24p' "$0"; exit 2 ;;
esac
