# Sourced by the GPU scripts (gpu_check.sh, gpu_bench.sh), from the repo root: this checkout's
# pagedlora first on the Python path without installing it. A package folder of links, with
# kernels/ and scheduler/ where pyproject.toml's package-dir puts them; and not the current
# folder, whose pagedlora/ lacks them (PYTHONSAFEPATH: Python >= 3.11). The folder is removed
# when the sourcing script exits.
export PYTHONSAFEPATH=1
shim=$(mktemp -d)
trap 'rm -rf "$shim"' EXIT
mkdir "$shim/pagedlora"
ln -s "$PWD"/pagedlora/*.py "$shim/pagedlora/"
ln -s "$PWD/kernels" "$shim/pagedlora/kernels"
ln -s "$PWD/scheduler" "$shim/pagedlora/scheduler"
export PYTHONPATH="$shim${PYTHONPATH:+:$PYTHONPATH}"
