#!/usr/bin/env bash
# Pack this machine's FFCV for a machine that cannot install it (the lent H200: no package index,
# no Debian libturbojpeg or libopencv), into DEST (default .h200, which git ignores here):
#
#     bash bench/carry_ffcv.sh [DEST]       # then: device run with carry [".h200"], bench/accelerator.sh
#
# DEST/site: FFCV and its pure-Python needs, and google-crc32c's wheel (the data's checksums) for
# the other machine's Python (CARRY_PYTHON, 3.12). FFCV loads _libffcv through ctypes and calls no
# Python API beyond PyModule_Create2, so the extension, renamed to the suffix every CPython imports
# (.so), runs under another version. DEST/lib: the libraries _libffcv links, less the C and C++
# runtimes (the other machine's newer ones serve). DEST/torchcodec: TorchCodec's wheel for that
# Python; accelerator.sh uses it only where it decodes there (built for this machine's torch).
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${1:-.h200}
PYTHON=${PYTHON:-.venv/bin/python}
site=$($PYTHON -c "import ffcv, os; print(os.path.dirname(os.path.dirname(ffcv.__file__)))")
rm -rf "$DEST/site" "$DEST/lib"
mkdir -p "$DEST/site" "$DEST/lib"
for package in ffcv assertpy fastargs terminaltables pytorch_pfn_extras; do
  cp -r "$site/$package" "$DEST/site/"
done
find "$DEST/site" -name __pycache__ -prune -exec rm -rf {} +
rm -rf "$DEST/site/ffcv/benchmarks"
extension=$(ls "$DEST"/site/ffcv/_libffcv.*so)
mv "$extension" "$DEST/site/ffcv/_libffcv.so"
ldd "$DEST/site/ffcv/_libffcv.so" | awk '/=> \// {print $3}' | while read -r lib; do
  case $(basename "$lib") in
    libc.so.*|libm.so.*|libstdc++.so.*|libgcc_s.so.*) ;;
    *) cp -L "$lib" "$DEST/lib/" ;;
  esac
done
wheels=$(mktemp -d)
wheel() {  # wheel NAME: this machine's version of NAME, built for the other machine's Python
  $PYTHON -m pip download -q "$1==$($PYTHON -c "import importlib.metadata as m; print(m.version('$1').split('+')[0])")" \
    --no-deps --only-binary=:all: --python-version "${CARRY_PYTHON:-3.12}" --platform manylinux_2_28_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$wheels"
}
wheel google-crc32c && $PYTHON -m zipfile -e "$wheels"/google_crc32c-*.whl "$DEST/site/" \
  || { echo "carry_ffcv: no google-crc32c wheel for Python ${CARRY_PYTHON:-3.12}"; exit 1; }
if wheel torchcodec; then
  rm -rf "$DEST/torchcodec" && mkdir -p "$DEST/torchcodec"
  $PYTHON -m zipfile -e "$wheels"/torchcodec-*.whl "$DEST/torchcodec/"
else
  echo "carry_ffcv: no torchcodec wheel for Python ${CARRY_PYTHON:-3.12}: the other machine decodes with torchvision.io"
fi
rm -rf "$wheels"
if [ "$DEST" = .h200 ] && ! grep -qsx "/.h200/" .git/info/exclude; then
  mkdir -p .git/info && echo "/.h200/" >>.git/info/exclude
fi
echo "carry_ffcv: $(du -sh "$DEST" | cut -f1) in $DEST ($(ls "$DEST/lib" | wc -l) libraries)"
