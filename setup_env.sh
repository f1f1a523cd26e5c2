# Sourced by quickstart.sh and test.sh: use the active Python environment, or make ./.venv, and install
# this project into it, editable, as the argument says: `.` (the core: train, evaluate, recommend) or
# `.[dev]` (also what the tests, the linter and every benchmark need). Always pass it: a bare `source`
# hands this file the caller's own arguments.
# TORCH_SPEC picks the torch to install (e.g. TORCH_SPEC="torch==2.13.0" for a CPU-only wheel).
root="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)"
if [ -z "${VIRTUAL_ENV:-}${CONDA_PREFIX:-}" ]; then
    if [ ! -x "$root/.venv/bin/python" ]; then
        python3 -m venv "$root/.venv" || { echo "setup_env.sh: could not create $root/.venv (is python3-venv installed?)" >&2; exit 1; }
    fi
    # shellcheck disable=SC1091
    source "$root/.venv/bin/activate"
fi
target="$1"
# Installed again only when what is asked for changes: the torch, this checkout (an editable install
# points at one), the target or pyproject.toml.
stamp="${VIRTUAL_ENV:-${CONDA_PREFIX:-.}}/.ncf-install"
wanted="${TORCH_SPEC:-torch} $root $target $(md5sum < "$root/pyproject.toml")"
if [ "$(cat "$stamp" 2>/dev/null)" != "$wanted" ]; then
    python -m pip install --quiet --disable-pip-version-check "${TORCH_SPEC:-torch}" -e "$target" \
        || { echo "setup_env.sh: installing ${TORCH_SPEC:-torch} and $target failed" >&2; exit 1; }
    case "$target" in  # the 'sharding' extra's TorchRec, without the CUDA fbgemm-gpu its metadata asks for
        *dev*|*sharding*) python -m pip install --quiet --disable-pip-version-check --no-deps torchrec==1.8.0 \
            || { echo "setup_env.sh: installing torchrec failed" >&2; exit 1; } ;;
    esac
    echo "$wanted" > "$stamp"
fi
