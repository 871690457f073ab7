#!/usr/bin/env bash
# Makes (once) the Python environment the torch tests run in: a virtual
# environment with PyTorch from the package registry, cached in
# ${STP_VENV:-~/.cache/stp/venv} and reused by every later run. Prints the
# interpreter's path on its last line.
set -euo pipefail
venv="${STP_VENV:-$HOME/.cache/stp/venv}"
torch_version="2.9.1"

if ! command -v python3 >/dev/null 2>&1; then
  echo "== installing python3" >&2
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3 python3-venv >&2
fi
if [ ! -x "$venv/bin/python" ]; then
  echo "== creating $venv" >&2
  if ! python3 -m venv "$venv" >&2; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >&2
    python3 -m venv "$venv" >&2
  fi
fi
if ! "$venv/bin/python" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$torch_version')" 2>/dev/null; then
  echo "== installing torch $torch_version into $venv (about 4 GB, once)" >&2
  "$venv/bin/pip" install --quiet --disable-pip-version-check "torch==$torch_version" numpy >&2
fi
echo "$venv/bin/python"
