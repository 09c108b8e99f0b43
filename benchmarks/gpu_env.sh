# Sourced by gpu_check.sh and gpu_row.sh from the repository root: the Python to use ($PYTHON, default python3),
# the project on PYTHONPATH, and whatever this machine lacks installed from local wheels (.gpu/wheels, or
# $GPU_WHEELS) into .gpu/site by benchmarks/gpu_deps.py, which never installs torch's own dependencies.
python=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
site=$("$python" benchmarks/gpu_deps.py --wheels "${GPU_WHEELS:-.gpu/wheels}" --target "${GPU_SITE:-.gpu/site}") || exit 2
if [ -n "$site" ]; then
    export PYTHONPATH="$site:$PYTHONPATH"
fi
export PYTHONUNBUFFERED=1
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} HF_DATASETS_OFFLINE=${HF_DATASETS_OFFLINE:-1}  # no internet there
