#!/usr/bin/env bash
# Make Fashion-MNIST available: Debian's package dataset-fashion-mnist puts the IDX files under
# /usr/share/datasets/fashion-mnist. Installs it when apt-get is usable; otherwise says what to do.
set -euo pipefail
dir=/usr/share/datasets/fashion-mnist
if [ -n "${DEEPHASH_DATA:-}" ] && [ -f "$DEEPHASH_DATA/fashion-mnist/train-images-idx3-ubyte.gz" -o -f "${DEEPHASH_DATA:-}/train-images-idx3-ubyte.gz" ]; then
  exit 0
fi
[ -f "$dir/train-images-idx3-ubyte.gz" ] && exit 0
if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  echo "Fashion-MNIST not found: installing Debian's dataset-fashion-mnist" >&2
  apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null
elif command -v sudo >/dev/null && command -v apt-get >/dev/null; then
  sudo apt-get update -qq && sudo apt-get install -y -qq dataset-fashion-mnist >/dev/null
fi
if [ ! -f "$dir/train-images-idx3-ubyte.gz" ]; then
  echo "Fashion-MNIST not found. Install Debian's package dataset-fashion-mnist, or put the four" >&2
  echo "official files (train-images-idx3-ubyte.gz, ...) in a folder and set DEEPHASH_DATA to it." >&2
  exit 1
fi
