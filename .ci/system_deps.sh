#!/usr/bin/env bash
# System packages the tests use: a real single-node SLURM (launch/ tests) and headless Chromium (the HTML
# report screenshot test). Idempotent; needs root (tests that need these skip without them).
set -euo pipefail
packages=(slurmctld slurmd slurm-client munge chromium)
missing=()
for package in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
done
if [ ${#missing[@]} -eq 0 ]; then
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "system_deps: not root; missing ${missing[*]} (the tests that need them will be skipped)" >&2
    exit 0
fi
echo "system_deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
if ! { apt-get update -qq && apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null; }; then
    # The suite still runs: the tests that need these packages skip and say why.
    echo "system_deps: could not install ${missing[*]}; the tests that need them will be skipped" >&2
fi
