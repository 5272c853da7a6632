#!/usr/bin/env bash
# Debian's packages the tests use besides Python and Java: Prometheus (tests/test_platform.py
# scrapes the running dataflows with it and asks it every dashboard panel's PromQL) and
# Chromium (the same test opens `patternflow report`'s page headless). Installed once.
set -euo pipefail
need=()
command -v prometheus >/dev/null || need+=(prometheus)
command -v chromium >/dev/null || need+=(chromium)
if ((${#need[@]})); then
    sudo=$([ "$(id -u)" = 0 ] || echo sudo)
    if [ -n "$sudo" ] && ! sudo -n true 2>/dev/null; then
        echo "tests/test_platform.py needs ${need[*]} (Debian packages): run 'sudo apt-get install ${need[*]}'," >&2
        echo "then 'make test' again; 'make test-fast' runs without them" >&2
        exit 1
    fi
    echo "installing ${need[*]} (Debian packages) for the tests"
    $sudo apt-get update -q >/dev/null || echo "apt-get update failed; trying the package lists there are"
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${need[@]}" >/dev/null
fi
