#!/usr/bin/env bash
# Download the wheels listed in bench/gpu/wheels.txt into .whl/ at the repository root, for a
# Python 3.12 manylinux x86_64 machine without network (run where pip can reach PyPI).
set -euo pipefail
cd "$(dirname "$0")/../.."

mapfile -t pins < <(sed -e 's/#.*//' -e 's/[[:space:]]//g' bench/gpu/wheels.txt | grep -v '^$')
mkdir -p .whl
python3 -m pip download --quiet --no-deps --only-binary=:all: \
    --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
    -d .whl "${pins[@]}"

# pip installs nothing when two versions of one project lie side by side.
duplicates=$(for wheel in .whl/*.whl; do
    basename "$wheel" | cut -d- -f1 | tr 'A-Z_.' 'a-z--'
done | sort | uniq -d)
if [ -n "$duplicates" ]; then
    echo "more than one wheel of: $duplicates (remove the stale ones from .whl/)" >&2
    exit 1
fi
echo "${#pins[@]} wheels pinned; .whl/ holds $(ls .whl/*.whl | wc -l) wheels, $(du -sh .whl | cut -f1)"
