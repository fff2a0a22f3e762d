#!/usr/bin/env bash
# Installs what the project needs into a virtual environment, .venv/, and nothing outside it:
#  - the Python packages of requirements.txt, then torchattacks without its dependencies (it pins
#    requests~=2.25.1, which it never imports; installing it normally would downgrade requests);
#  - where apt is available, Debian's Fashion-MNIST (real data that works offline; the tests and the demo use it).
# The environment sees the system's packages (--system-site-packages), so an installed PyTorch is reused
# instead of downloaded again; whatever pip installs lands in .venv/ only.
# Then: .venv/bin/python reproduce.py --preset demo (or `source .venv/bin/activate` first).
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv --system-site-packages "$VENV" \
    || { echo "install.sh: could not create the virtual environment $VENV (on Debian/Ubuntu: apt-get install python3-venv)" >&2; exit 1; }
fi
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -r requirements.txt
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps torchattacks==3.5.1
if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null 2>&1; then
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo -n"
  if ! $SUDO apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1; then
    $SUDO apt-get update -q >/dev/null 2>&1 && $SUDO apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 \
      || echo "install.sh: could not apt-get install dataset-fashion-mnist; Fashion-MNIST will be downloaded by torchvision instead" >&2
  fi
fi
echo "install.sh: done; the environment is $VENV (run scripts with $VENV/bin/python, or source $VENV/bin/activate)"
