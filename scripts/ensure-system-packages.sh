#!/usr/bin/env bash
# Install the Debian packages that `make test` / `make demo` need, when they are missing.
#
#   scripts/ensure-system-packages.sh test   # chromium, chromium-driver, dataset-fashion-mnist
#   scripts/ensure-system-packages.sh demo   # dataset-fashion-mnist
#
# Each needed thing is checked first; nothing is installed when all are present. Missing ones are
# installed with `apt-get update` then `apt-get install` (through sudo when not root). When apt-get
# is not usable, or the install fails, one line on stderr says what to install, and the exit
# status is 1 (`make test` goes on, so the tests that need the package fail and show it).
#
# Only bash builtins are used besides apt-get and sudo, so the checks can be tested with any PATH.
# Overridable (for tests, or a non-Debian layout): DEEPHASH_CHROMIUM (default /usr/bin/chromium),
# DEEPHASH_CHROMEDRIVER (/usr/bin/chromedriver), DEEPHASH_FMNIST_DIR
# (/usr/share/datasets/fashion-mnist), DEEPHASH_UID (the effective user id). Fashion-MNIST also
# counts as present when $DEEPHASH_DATA (or $DEEPHASH_DATA/fashion-mnist) holds its files, as
# deephash.load_dataset looks there too.
set -uo pipefail

mode=${1:-test}
chromium=${DEEPHASH_CHROMIUM:-/usr/bin/chromium}
chromedriver=${DEEPHASH_CHROMEDRIVER:-/usr/bin/chromedriver}
fmnist=${DEEPHASH_FMNIST_DIR:-/usr/share/datasets/fashion-mnist}
uid=${DEEPHASH_UID:-$EUID}

has_fmnist() {  # the four official IDX files, gzipped or not, in one of the folders load_dataset reads
  local dir stem ok
  for dir in "$fmnist" ${DEEPHASH_DATA:+"$DEEPHASH_DATA" "$DEEPHASH_DATA/fashion-mnist"}; do
    ok=1
    for stem in train-images-idx3-ubyte train-labels-idx1-ubyte t10k-images-idx3-ubyte t10k-labels-idx1-ubyte; do
      [[ -f "$dir/$stem.gz" || -f "$dir/$stem" ]] || ok=0
    done
    (( ok )) && return 0
  done
  return 1
}

check() {  # check NAME PACKAGE: record PACKAGE when NAME is missing
  local what=$1 package=$2 present=0
  if [[ $what == fashion-mnist ]]; then has_fmnist && present=1; else [[ -x $what ]] && present=1; fi
  if (( ! present )); then
    missing_packages+=("$package")
    missing_what+=("$([[ $what == fashion-mnist ]] && echo "Fashion-MNIST ($fmnist)" || echo "$what")")
  fi
}

scan() {  # fill missing_packages / missing_what and set $what ("a, b") for this mode
  missing_packages=()
  missing_what=()
  case $mode in
    test) check "$chromium" chromium; check "$chromedriver" chromium-driver; check fashion-mnist dataset-fashion-mnist ;;
    demo) check fashion-mnist dataset-fashion-mnist ;;
  esac
  what=$(IFS=';'; echo "${missing_what[*]}")
  what=${what//;/, }
}

[[ $mode == test || $mode == demo ]] || { echo "usage: $0 test|demo" >&2; exit 2; }
scan
(( ${#missing_packages[@]} == 0 )) && exit 0
packages="${missing_packages[*]}"

apt=()
if command -v apt-get >/dev/null 2>&1; then
  if [[ $uid == 0 ]]; then
    apt=(apt-get)
  elif command -v sudo >/dev/null 2>&1; then
    apt=(sudo DEBIAN_FRONTEND=noninteractive apt-get)
  fi
fi

if (( ${#apt[@]} )); then
  echo "deephash: $what missing: installing Debian's $packages with apt-get" >&2
  export DEBIAN_FRONTEND=noninteractive
  start=$SECONDS
  if "${apt[@]}" update -qq && "${apt[@]}" install -y -qq -o DPkg::Lock::Timeout=300 $packages >/dev/null; then
    scan
    if (( ${#missing_packages[@]} == 0 )); then
      echo "deephash: installed $packages in $((SECONDS - start)) s" >&2
      exit 0
    fi
  fi
  echo "deephash: $what still missing after apt-get: install Debian's ${missing_packages[*]} (apt-get install ${missing_packages[*]})" >&2
  exit 1
fi

echo "deephash: $what missing and apt-get is not usable here (needs root or sudo): run make $mode as root, or apt-get install ${missing_packages[*]}" >&2
exit 1
