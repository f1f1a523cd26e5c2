# Sourced by quickstart.sh and test.sh: use the active Python environment, or make ./.venv.
# TORCH_SPEC picks the torch to install (e.g. TORCH_SPEC="torch==2.13.0" for a CPU-only wheel).
# Arguments: the requirement files to install (always pass them: a bare `source` hands this file
# the caller's own arguments).
if [ -z "${VIRTUAL_ENV:-}${CONDA_PREFIX:-}" ]; then
    root="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
    if [ ! -x "$root/.venv/bin/python" ]; then
        python3 -m venv "$root/.venv" || { echo "setup_env.sh: could not create $root/.venv (is python3-venv installed?)" >&2; exit 1; }
    fi
    # shellcheck disable=SC1091
    source "$root/.venv/bin/activate"
fi
requirements=("$@")
stamp="${VIRTUAL_ENV:-${CONDA_PREFIX:-.}}/.ncf-requirements"
wanted="${TORCH_SPEC:-torch} $(cat "${requirements[@]}" | md5sum)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$wanted" ]; then
    python -m pip install --quiet --disable-pip-version-check "${TORCH_SPEC:-torch}" \
        || { echo "setup_env.sh: installing ${TORCH_SPEC:-torch} failed" >&2; exit 1; }
    for file in "${requirements[@]}"; do
        python -m pip install --quiet --disable-pip-version-check -r "$file" \
            || { echo "setup_env.sh: installing $file failed" >&2; exit 1; }
    done
    echo "$wanted" > "$stamp"
fi
