#!/usr/bin/env bash
# Makes sure what the build needs is on this machine: the Rust toolchain (not
# installed here: it comes from rustup) and cmake (Pingora's zlib-ng build).
# Installs cmake with apt-get when it can, else says exactly what is missing.
# With --test-tools, also promtool (Debian package `prometheus`), which the
# metrics tests use to lint /metrics, ffmpeg, which the transcoding tests
# run, Chromium, which plays HLS in the browser test, and schemathesis (PyPI,
# in a private venv under target/), which the API tests run against
# docs/openapi.json, and redis-server, which the cluster tests start; without
# them those checks are skipped. m3u-edge itself
# needs ffmpeg only to transcode (`apt-get install ffmpeg`).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"

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

# The schemathesis release the API test is written for (its CLI flags and
# config file keys).
SCHEMATHESIS_VERSION=4.32.5

# Makes the venv $1 for schemathesis and prints the pip command that installs
# into it. Debian's python3 ships venv's own pip separately (python3-venv):
# it is added when we can, else the venv is made without pip and filled by
# the system's pip (pip >= 22.3 has --python).
make_venv() {
    local venv="$1"
    if python3 -m venv "$venv" >/dev/null 2>&1 && [ -x "$venv/bin/pip" ]; then
        echo "$venv/bin/python -m pip"
        return 0
    fi
    rm -rf "$venv"
    local sudo=""
    if [ "$(id -u)" != 0 ] && command -v sudo >/dev/null 2>&1 && sudo -n true >/dev/null 2>&1; then
        sudo="sudo"
    fi
    if command -v apt-get >/dev/null 2>&1 && { [ "$(id -u)" = 0 ] || [ -n "$sudo" ]; }; then
        local pkg
        pkg="python$(python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])')-venv"
        echo "installing $pkg (for the schemathesis venv)..." >&2
        $sudo apt-get update -qq >/dev/null 2>&1 || true
        $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$pkg" >/dev/null 2>&1 ||
            $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null 2>&1 ||
            true
        if python3 -m venv "$venv" >/dev/null 2>&1 && [ -x "$venv/bin/pip" ]; then
            echo "$venv/bin/python -m pip"
            return 0
        fi
        rm -rf "$venv"
    fi
    if python3 -m venv --without-pip "$venv" >/dev/null 2>&1 &&
        python3 -m pip --python "$venv/bin/python" --version >/dev/null 2>&1; then
        echo "python3 -m pip --python $venv/bin/python"
        return 0
    fi
    rm -rf "$venv"
    return 1
}

# Installs schemathesis from PyPI into target/schemathesis-venv (where the
# API test looks for it) if it is missing or another version. Optional:
# never fails the script, because without it the schemathesis test only
# prints "SKIPPED: schemathesis not installed".
install_schemathesis() {
    local venv="$root/target/schemathesis-venv"
    if "$venv/bin/st" --version 2>/dev/null | grep -qF "$SCHEMATHESIS_VERSION"; then
        return 0
    fi
    if ! command -v python3 >/dev/null 2>&1; then
        echo "note: schemathesis not installed (optional; needs python3) - the API" \
             "schemathesis test will be skipped" >&2
        return 0
    fi
    echo "installing schemathesis $SCHEMATHESIS_VERSION into $venv (optional, for the API test)..." >&2
    rm -rf "$venv"
    mkdir -p "$root/target"
    local pip
    # $pip is a command line: split on purpose.
    # shellcheck disable=SC2086
    if pip="$(make_venv "$venv")" &&
        $pip install -q --disable-pip-version-check "schemathesis==$SCHEMATHESIS_VERSION" >/dev/null 2>&1 &&
        "$venv/bin/st" --version >/dev/null 2>&1; then
        echo "schemathesis installed" >&2
    else
        rm -rf "$venv"
        echo "note: could not install schemathesis (optional; needs python3 >= 3.11 with" \
             "venv or pip, and PyPI); the API schemathesis test will be skipped" >&2
    fi
    return 0
}

# The streamlink and yt-dlp releases the resolver tests are written for.
STREAMLINK_VERSION=8.6.3
YTDLP_VERSION=2026.10.26

# Installs streamlink and yt-dlp from PyPI into target/resolvers-venv (where
# the resolver tests look for them, unless M3U_EDGE_STREAMLINK /
# M3U_EDGE_YTDLP name others) if missing or other versions. Optional: never
# fails the script; without them the resolver tests print "SKIPPED".
# m3u-edge itself finds them on PATH or at resolvers.streamlink/yt_dlp.
install_resolvers() {
    local venv="$root/target/resolvers-venv"
    if "$venv/bin/streamlink" --version 2>/dev/null | grep -qF "$STREAMLINK_VERSION" &&
        "$venv/bin/yt-dlp" --version 2>/dev/null | grep -qF "$YTDLP_VERSION"; then
        return 0
    fi
    if ! command -v python3 >/dev/null 2>&1; then
        echo "note: streamlink and yt-dlp not installed (optional; needs python3) - the" \
             "resolver tests will be skipped" >&2
        return 0
    fi
    echo "installing streamlink $STREAMLINK_VERSION and yt-dlp $YTDLP_VERSION into $venv" \
         "(optional, for the resolver tests)..." >&2
    rm -rf "$venv"
    mkdir -p "$root/target"
    local pip
    # $pip is a command line: split on purpose.
    # shellcheck disable=SC2086
    if pip="$(make_venv "$venv")" &&
        $pip install -q --disable-pip-version-check "streamlink==$STREAMLINK_VERSION" \
            "yt-dlp==$YTDLP_VERSION" >/dev/null 2>&1 &&
        "$venv/bin/streamlink" --version >/dev/null 2>&1 &&
        "$venv/bin/yt-dlp" --version >/dev/null 2>&1; then
        echo "streamlink and yt-dlp installed" >&2
    else
        rm -rf "$venv"
        echo "note: could not install streamlink and yt-dlp (optional; needs python3 with" \
             "venv or pip, and PyPI); the resolver tests will be skipped" >&2
    fi
    return 0
}

# redis-server (Debian's package) for the cluster tests, which start their
# own instances on free loopback ports. The package also ships a system
# service listening on 6379: stopped and disabled here, the tests never use it.
install_redis() {
    command -v redis-server >/dev/null 2>&1 && return 0
    install_optional redis-server redis-server "the cluster tests" || true
    if command -v redis-server >/dev/null 2>&1; then
        local sudo=""
        [ "$(id -u)" != 0 ] && sudo="sudo"
        if [ -d /run/systemd/system ]; then
            $sudo systemctl disable --now redis-server >/dev/null 2>&1 || true
        else
            $sudo service redis-server stop >/dev/null 2>&1 || true
        fi
    fi
    return 0
}

# Only the test suite needs these: `scripts/test.sh` asks with --test-tools.
if [ "${1:-}" = "--test-tools" ]; then
    install_promtool || true
    install_optional ffmpeg ffprobe "the transcoding tests" || true
    install_optional chromium chromium "the browser playback test" || true
    install_schemathesis || true
    install_resolvers || true
    install_redis || true
fi
