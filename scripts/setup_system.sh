#!/usr/bin/env bash
# Install the Debian packages FFCV builds against, once. Idempotent: a no-op when present.
# Elsewhere (not Debian, not root) it says exactly what to install and stops.
set -euo pipefail
PKGS="pkg-config libturbojpeg0-dev libopencv-dev"
missing=""
if command -v dpkg-query >/dev/null 2>&1; then
  for p in $PKGS; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
  done
else
  if pkg-config --exists opencv4 libturbojpeg 2>/dev/null; then exit 0; fi
  echo "setup: this is not a Debian-like system. FFCV needs pkg-config, libturbojpeg and OpenCV 4 (with" >&2
  echo "       their headers) before 'pip install ffcv': e.g. 'dnf install pkgconf turbojpeg-devel opencv-devel'" >&2
  echo "       or 'brew install pkg-config jpeg-turbo opencv', then run this command again." >&2
  exit 1
fi
[ -z "$missing" ] && exit 0
if [ "$(id -u)" != 0 ]; then
  echo "setup: missing Debian packages:$missing" >&2
  echo "       run: sudo apt-get update && sudo apt-get install -y$missing   then run this command again." >&2
  exit 1
fi
echo "setup: installing Debian packages:$missing" >&2
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >/dev/null
