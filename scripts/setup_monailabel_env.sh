#!/usr/bin/env bash
# Build MONAI Label 0.8.5's own virtual env once and reuse it (it cannot share the project's env:
# it needs torchvision and pydicom < 3). Prints the env's python on the last line.
#   MONAILABEL_VENV  where to build it (default: ~/.cache/custom_nets/monailabel-0.8.5)
set -euo pipefail
venv="${MONAILABEL_VENV:-$HOME/.cache/custom_nets/monailabel-0.8.5}"
stamp="$venv/.complete"
if [ ! -f "$stamp" ]; then
    echo "building MONAI Label env in $venv (once; several GB, several minutes)" >&2
    rm -rf "$venv"
    python3 -m venv "$venv"
    "$venv/bin/python" -m pip install -q --upgrade pip >&2
    "$venv/bin/python" -m pip install -q "monailabel==0.8.5" >&2
    "$venv/bin/python" -m pip install -q "pydicom<3" "dicomweb-client<0.60" "pynetdicom<3" >&2
    "$venv/bin/python" -c "import monailabel, monai; print('monailabel', monailabel.__version__, 'monai', monai.__version__)" >&2
    touch "$stamp"
fi
echo "$venv/bin/python"
