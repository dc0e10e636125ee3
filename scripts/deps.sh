#!/usr/bin/env bash
# Makes sure what the build needs is on this machine: the Rust toolchain (not
# installed here: it comes from rustup) and cmake (Pingora's zlib-ng build).
# Installs cmake with apt-get when it can, else says exactly what is missing.
set -euo pipefail

if ! command -v cargo >/dev/null 2>&1; then
    echo "missing: the Rust toolchain (cargo). Install it with rustup: https://rustup.rs" >&2
    exit 1
fi

if ! command -v cmake >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "installing cmake (needed to build Pingora)..." >&2
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq cmake >/dev/null
    elif command -v sudo >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
        echo "installing cmake with sudo (needed to build Pingora)..." >&2
        sudo apt-get update -qq
        sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq cmake >/dev/null
    else
        echo "missing: cmake (needed to build Pingora). Install it: apt-get install cmake" >&2
        exit 1
    fi
fi
