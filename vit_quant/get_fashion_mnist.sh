#!/usr/bin/env bash
# Fashion-MNIST for the embedded ViT: installs the Debian package dataset-fashion-mnist (the four IDX files
# in /usr/share/datasets/fashion-mnist) when it is not there yet. Used by `make data-fashion-mnist` and by
# vit_quant/run_deit.sh. Needs apt-get and root (or sudo); otherwise it says what to do instead and exits 1.
set -euo pipefail
FOLDER=/usr/share/datasets/fashion-mnist
FILES="train-images-idx3-ubyte train-labels-idx1-ubyte t10k-images-idx3-ubyte t10k-labels-idx1-ubyte"

complete() {
  for stem in $FILES; do
    [ -f "$FOLDER/$stem.gz" ] || [ -f "$FOLDER/$stem" ] || return 1
  done
}

cannot() {
  echo "error: cannot install Fashion-MNIST here: $1." >&2
  echo "  Either install the Debian package yourself (sudo apt-get install dataset-fashion-mnist), or put the" >&2
  echo "  four IDX files ($FILES, .gz or plain) from github.com/zalandoresearch/fashion-mnist in a folder" >&2
  echo "  and pass it: DATA=/that/folder bash vit_quant/run_deit.sh (or --data_path /that/folder)." >&2
  exit 1
}

complete && exit 0
command -v apt-get > /dev/null || cannot "apt-get is not available (not a Debian/Ubuntu system)"
if [ "$(id -u)" = 0 ]; then
  SUDO=""
elif command -v sudo > /dev/null && sudo -n true 2> /dev/null; then
  SUDO="sudo -n"
else
  cannot "installing a package needs root, and sudo is not available without a password"
fi
echo "installing the Debian package dataset-fashion-mnist (Fashion-MNIST, 30 MB) ..."
$SUDO apt-get install -y -q dataset-fashion-mnist > /dev/null 2>&1 \
  || { $SUDO apt-get update -q > /dev/null 2>&1 && $SUDO apt-get install -y -q dataset-fashion-mnist > /dev/null; } \
  || cannot "apt-get could not install dataset-fashion-mnist (no package index or no network to the mirror?)"
complete || cannot "the package installed, but $FOLDER lacks some of the four files"
echo "Fashion-MNIST is in $FOLDER"
