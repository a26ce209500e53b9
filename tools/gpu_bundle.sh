#!/usr/bin/env bash
# Pack DALI and what it needs for the lent GPU machine (no network; Python 3.12, x86-64, CUDA 13 driver and
# torch 2.11+cu130) into pieces small enough to carry one per call (the device tool carries 64 MiB at a time):
#
#   bash tools/gpu_bundle.sh DIR        # -> DIR/site.tar.xz.0, .1, .2 (about 141 MiB in all) and DIR/SHA256SUMS
#
# Pieces of 56 MiB: with the working tree (under 1 MiB), each call stays under the 64 MiB the tool carries.
#
# The CUDA 13 build of DALI 2.4.0 with nvImageCodec and nvJPEG for CUDA 13, without their optional extras
# (nvCOMP, nvTIFF, nvJPEG2000: nothing here decodes TIFF or JPEG 2000), and DALI's pure-Python dependencies the
# machine lacks. The project itself depends on nvidia-dali-cuda120 (the CPU machines' build); this bundle is for
# the GPU round only. xz packs DALI's libraries to about half the size of its wheel. On the GPU machine,
# tools/gpu_check.sh DIR install joins and unpacks them.
set -euo pipefail
DIR=$(realpath -m "${1:?usage: gpu_bundle.sh DIR}"); mkdir -p "$DIR"
TMP=$(mktemp -d); trap 'rm -rf "$TMP"' EXIT
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d "$TMP/wheels" nvidia-dali-cuda130==2.4.0 nvidia-nvimgcodec-cu13==0.9.0.20 \
  nvidia-nvjpeg==13.0.4.44 astunparse==1.6.3 gast==0.7.0 makefun==1.16.0 optree==0.20.0 nvtx==0.2.17 libcst==1.8.6 \
  webdataset==1.0.2 braceexpand==0.1.7
mkdir -p "$TMP/site"
for w in "$TMP"/wheels/*.whl; do unzip -q -o "$w" -d "$TMP/site"; done
# headers, and the extension modules of Pythons other than 3.12, are not needed to run
rm -rf "$TMP/site/nvidia/dali/include"
find "$TMP/site/nvidia/dali" -name '*.cpython-3*' ! -name '*cpython-312-*' -delete
rm -f "$DIR"/site.tar.xz.* "$DIR/SHA256SUMS"
tar -cf - -C "$TMP" site | xz -9 -T0 | split -b 56M -d -a 1 - "$DIR/site.tar.xz."
# what the round checks before it installs: every piece there, each whole (tools/gpu_check.sh check)
(cd "$DIR" && sha256sum site.tar.xz.* > SHA256SUMS)
ls -la "$DIR"
