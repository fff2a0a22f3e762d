#!/usr/bin/env bash
# Installs what the project needs: the Python packages of requirements.txt and, where apt is
# available, Debian's Fashion-MNIST (real data that works offline; the tests and the demo use it).
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
"$PYTHON" -m pip install --quiet -r requirements.txt
if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null 2>&1; then
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo -n"
  if ! $SUDO apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1; then
    $SUDO apt-get update -q >/dev/null 2>&1 && $SUDO apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 \
      || echo "install.sh: could not apt-get install dataset-fashion-mnist; Fashion-MNIST will be downloaded by torchvision instead" >&2
  fi
fi
echo "install.sh: done"
