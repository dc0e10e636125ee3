#!/usr/bin/env bash
# Makes sure what the build needs is on this machine: the Rust toolchain (not
# installed here: it comes from rustup) and cmake (Pingora's zlib-ng build).
# Installs cmake with apt-get when it can, else says exactly what is missing.
# With --test-tools, also promtool (Debian package `prometheus`), which the
# metrics tests use to lint /metrics, and ffmpeg, which the transcoding tests
# run, and Chromium, which plays HLS in the browser test; without them those
# checks are skipped. m3u-edge itself needs ffmpeg
# only to transcode (`apt-get install ffmpeg`).
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

# Installs promtool if missing. Optional: never fails the script, and says
# what happened, because without it the metrics lint test only prints
# "SKIPPED: promtool not installed".
install_promtool() {
    command -v promtool >/dev/null 2>&1 && return 0
    local sudo=""
    if [ "$(id -u)" != 0 ]; then
        if command -v sudo >/dev/null 2>&1 && sudo -n true >/dev/null 2>&1; then
            sudo="sudo"
        else
            echo "note: promtool not installed (optional; apt-get install prometheus as root" \
                 "enables the /metrics lint test)" >&2
            return 0
        fi
    fi
    if ! command -v apt-get >/dev/null 2>&1; then
        echo "note: promtool not installed (optional; install Prometheus's promtool to" \
             "enable the /metrics lint test)" >&2
        return 0
    fi
    echo "installing promtool (Debian package prometheus; optional, for the /metrics lint test)..." >&2
    # --no-install-recommends: only what promtool needs, no suggested extras.
    if $sudo apt-get update -qq >/dev/null 2>&1 &&
        $sudo env DEBIAN_FRONTEND=noninteractive \
            apt-get install -y -qq --no-install-recommends prometheus >/dev/null 2>&1 &&
        command -v promtool >/dev/null 2>&1; then
        echo "promtool installed" >&2
        if [ -d /run/systemd/system ]; then
            echo "note: the prometheus package also ships prometheus.service; if you do not" \
                 "want a Prometheus server here: $sudo systemctl disable --now prometheus" >&2
        fi
    else
        echo "note: could not install promtool (optional); the /metrics lint test will be skipped" >&2
    fi
    return 0
}

# Installs Debian package $1 when command $2 is missing; $3 says what for.
# Optional: never fails the script; without the package the tests that need
# it print "SKIPPED: ...".
install_optional() {
    local pkg=$1 cmd=$2 what=$3
    command -v "$cmd" >/dev/null 2>&1 && return 0
    local sudo=""
    if [ "$(id -u)" != 0 ]; then
        if command -v sudo >/dev/null 2>&1 && sudo -n true >/dev/null 2>&1; then
            sudo="sudo"
        else
            echo "note: $pkg not installed (apt-get install $pkg as root enables $what)" >&2
            return 0
        fi
    fi
    if ! command -v apt-get >/dev/null 2>&1; then
        echo "note: $pkg not installed (install it to enable $what)" >&2
        return 0
    fi
    echo "installing $pkg (Debian package; for $what)..." >&2
    if $sudo apt-get update -qq >/dev/null 2>&1 &&
        $sudo env DEBIAN_FRONTEND=noninteractive \
            apt-get install -y -qq --no-install-recommends "$pkg" >/dev/null 2>&1 &&
        command -v "$cmd" >/dev/null 2>&1; then
        echo "$pkg installed" >&2
    else
        echo "note: could not install $pkg; $what will be skipped" >&2
    fi
    return 0
}

# Only the test suite needs these: `scripts/test.sh` asks with --test-tools.
if [ "${1:-}" = "--test-tools" ]; then
    install_promtool || true
    install_optional ffmpeg ffprobe "the transcoding tests" || true
    install_optional chromium chromium "the browser playback test" || true
fi
