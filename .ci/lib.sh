# Helpers for the .ci scripts (sourced, not run).
#
# Each check gets a fresh, empty venv, and pip runs from outside it
# (`pip --python`): creating a venv without pip takes 0.2 s instead of the
# ~8 s that ensurepip costs, which adds up over one venv per extra. pip's own
# cache (~/.cache/pip) is shared by all of them, so a package is downloaded
# and built once per machine, not once per venv.

CI_PYTHON=${CI_PYTHON:-python3}

# fresh_venv DIR: an empty venv at DIR (removed first if it exists).
fresh_venv() {
    rm -rf "$1"
    "$CI_PYTHON" -m venv --without-pip "$1"
}

# pip_install DIR ARGS...: pip install -q ARGS into the venv at DIR.
pip_install() {
    local venv=$1
    shift
    # The local package index prints one "Location ... is ignored" line per
    # package it lacks: noise, not a problem; everything else is shown.
    "$CI_PYTHON" -m pip --python "$venv/bin/python" install -q "$@" 2>&1 \
        | { grep -v "^WARNING: Location '.*' is ignored" || true; }
    return "${PIPESTATUS[0]}"
}

# ci_tmp: a scratch folder for this run's venvs, removed when the script exits.
ci_tmp() {
    CI_TMP=$(mktemp -d "${TMPDIR:-/tmp}/greenchan-ci.XXXXXX")
    trap 'rm -rf "$CI_TMP"' EXIT
}
