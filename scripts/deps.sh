#!/usr/bin/env bash
# Makes sure what the build needs is on this machine: the Rust toolchain (not
# installed here: it comes from rustup) and cmake (Pingora's zlib-ng build).
# Installs cmake with apt-get when it can, else says exactly what is missing.
# With --test-tools, also promtool (Debian package `prometheus`), which the
# metrics tests use to lint /metrics, and ffmpeg, which the transcoding tests
# run; without them those checks are skipped. m3u-edge itself needs ffmpeg
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

# Installs ffmpeg (and ffprobe) if missing: the transcoding tests run the
# real thing. Without it those tests print "SKIPPED: ffmpeg not installed".
install_ffmpeg() {
    command -v ffmpeg >/dev/null 2>&1 && command -v ffprobe >/dev/null 2>&1 && return 0
    local sudo=""
    if [ "$(id -u)" != 0 ]; then
        if command -v sudo >/dev/null 2>&1 && sudo -n true >/dev/null 2>&1; then
            sudo="sudo"
        else
            echo "note: ffmpeg not installed (apt-get install ffmpeg as root enables the transcoding tests)" >&2
            return 0
        fi
    fi
    if ! command -v apt-get >/dev/null 2>&1; then
        echo "note: ffmpeg not installed (install it to enable the transcoding tests)" >&2
        return 0
    fi
    echo "installing ffmpeg (Debian package; for the transcoding tests)..." >&2
    if $sudo apt-get update -qq >/dev/null 2>&1 &&
        $sudo env DEBIAN_FRONTEND=noninteractive \
            apt-get install -y -qq --no-install-recommends ffmpeg >/dev/null 2>&1 &&
        command -v ffmpeg >/dev/null 2>&1; then
        echo "ffmpeg installed" >&2
    else
        echo "note: could not install ffmpeg; the transcoding tests will be skipped" >&2
    fi
    return 0
}

# Only the test suite needs these: `scripts/test.sh` asks with --test-tools.
if [ "${1:-}" = "--test-tools" ]; then
    install_promtool || true
    install_ffmpeg || true
fi
