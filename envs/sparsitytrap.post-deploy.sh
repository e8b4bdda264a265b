#!/usr/bin/env sh
# Run by snakemake inside the new conda environment, from the working directory (the
# repository root): install the sparsitytrap package itself, its dependencies being already
# pinned in sparsitytrap.yaml. Editable, so rules use the checkout's code.
set -eu
test -f pyproject.toml && grep -q '^name = "sparsitytrap"' pyproject.toml || {
    echo "sparsitytrap.post-deploy.sh: run snakemake from the sparsitytrap repository root" >&2
    exit 1
}
python -m pip install --no-deps -e .
