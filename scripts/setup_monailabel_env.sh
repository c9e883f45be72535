#!/usr/bin/env bash
# Build MONAI Label 0.8.5's own virtual env once and reuse it (it cannot share the project's env:
# it needs torchvision and pydicom < 3). Prints the env's python on the last line.
#   MONAILABEL_VENV  where to build it (default: ~/.cache/custom_nets/monailabel-0.8.5)
# custom_nets is not installed into the env: a server that serves research bundles gets this checkout on
# PYTHONPATH (always the checkout's current code; the hand-off server runs without it). The second step
# checks, once per version of pyproject.toml, that custom_nets' modules import there with the env's
# packages (MONAI 1.6.1, pydicom < 3).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
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
research_stamp="$venv/.custom_nets_checked-$(sha1sum "$repo/pyproject.toml" | cut -c1-12)"
if [ ! -f "$research_stamp" ]; then
    echo "checking that custom_nets (from $repo, on PYTHONPATH) imports in MONAI Label's env" >&2
    (cd "$venv" && PYTHONPATH="$repo" "$venv/bin/python" -c "
import importlib, pkgutil, custom_nets
for m in pkgutil.walk_packages(custom_nets.__path__, 'custom_nets.'):
    importlib.import_module(m.name)  # optional extras (onnxruntime, highdicom, av) are imported lazily
") >&2
    rm -f "$venv"/.custom_nets_checked-*
    touch "$research_stamp"
fi
echo "$venv/bin/python"
