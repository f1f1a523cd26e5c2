#!/usr/bin/env bash
# Download a MovieLens zip from GroupLens, verify its md5 and unpack it.
#
#   ./download_dataset.sh NAME [DIR]      NAME: ml-20m | ml-1m | ml-100k
#
# DIR defaults to $DATA_ROOT/NAME ($DATA_ROOT defaults to ./data next to this script). The zip is
# kept as DIR/NAME.zip and unpacked in DIR, as GroupLens lays it out: DIR/ml-20m/ratings.csv,
# DIR/ml-1m/ratings.dat, DIR/ml-100k/u.data. The download goes to DIR/NAME.zip.part and is renamed
# to DIR/NAME.zip only once its checksum is right, and unpacking happens in a temporary folder that
# is moved into place at the end, so an interrupted run never leaves files that look complete; the
# next run removes the temporary folder of a run that was killed.
# Without a network: download the zip by hand, put it at DIR/NAME.zip and run this again.
#
# Environment (mainly for mirrors and tests):
#   NCF_DOWNLOAD_URL_BASE  where the zips are fetched from instead of GroupLens, e.g. a mirror or
#                          file:///some/folder (curl only); the URL is $NCF_DOWNLOAD_URL_BASE/NAME.zip
#   NCF_DOWNLOAD_MD5       expected md5 instead of the official one (for a mirror's own packaging)
#   NCF_DOWNLOAD_RETRIES   download attempts (default 3)
set -euo pipefail

prog="download_dataset.sh"
err() { echo "$prog: error: $*" >&2; }
usage() { echo "usage: $prog NAME [DIR]   (NAME: ml-20m, ml-1m or ml-100k; DIR defaults to \$DATA_ROOT/NAME)"; }

case "${1:-}" in
    -h | --help) usage; exit 0 ;;
    "") usage >&2; exit 2 ;;
esac
if [ $# -gt 2 ]; then
    err "too many arguments"; usage >&2; exit 2
fi

name="$1"
case "$name" in
    ml-20m) official_md5="cd245b17a1ae2cc31bb14903e1204af3"; raw_file="ml-20m/ratings.csv" ;;
    ml-1m) official_md5="c4d9eecfca2ab87c1945afe126590906"; raw_file="ml-1m/ratings.dat" ;;
    ml-100k) official_md5="0e33842e24a9c977be4e0107933c0723"; raw_file="ml-100k/u.data" ;;
    *) err "unknown dataset '$name' (known: ml-20m, ml-1m, ml-100k)"; exit 2 ;;
esac

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
dir="${2:-${DATA_ROOT:-$here/data}/$name}"
expected_md5="$(echo "${NCF_DOWNLOAD_MD5:-$official_md5}" | tr 'A-F' 'a-f')"
url="${NCF_DOWNLOAD_URL_BASE:-https://files.grouplens.org/datasets/movielens}"
url="${url%/}/$name.zip"
zip="$dir/$name.zip"
part="$zip.part"
retries="${NCF_DOWNLOAD_RETRIES:-3}"

python_cmd() {
    if command -v python3 > /dev/null 2>&1; then echo python3; else echo python; fi
}

md5_of() {
    if command -v md5sum > /dev/null 2>&1; then
        md5sum "$1" | cut -d ' ' -f 1
    elif command -v md5 > /dev/null 2>&1; then
        md5 -q "$1"
    else
        "$(python_cmd)" -c 'import hashlib, sys
h = hashlib.md5()
with open(sys.argv[1], "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
        h.update(chunk)
print(h.hexdigest())' "$1"
    fi
}

# Files to remove if we stop early (a failed download, a failed unpack, Ctrl-C).
cleanup_paths=()
cleanup() {
    local path
    for path in ${cleanup_paths[@]+"${cleanup_paths[@]}"}; do
        rm -rf "$path"
    done
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

if ! mkdir -p "$dir" 2> /dev/null || [ ! -w "$dir" ]; then
    err "cannot write to $dir"
    exit 1
fi

# Unpacking happens in DIR/.unpack.PID: remove those of runs that were killed (their process is gone).
for stale in "$dir"/.unpack.*; do
    [ -d "$stale" ] || continue
    pid="${stale##*.}"
    if ! [[ "$pid" =~ ^[0-9]+$ ]] || ! kill -0 "$pid" 2> /dev/null; then
        rm -rf "$stale" 2> /dev/null || true
    fi
done

# 1. Get a verified zip at $zip.
if [ -f "$zip" ]; then
    have_md5="$(md5_of "$zip")"
    if [ "$have_md5" != "$expected_md5" ]; then
        err "$zip has md5 $have_md5, expected $expected_md5: it is damaged or not the official zip; delete it or replace it with the one from ${url}"
        exit 1
    fi
    echo "$zip is already downloaded (md5 verified)"
else
    cleanup_paths+=("$part")
    rm -f "$part"
    log="$(mktemp "${TMPDIR:-/tmp}/ncf-download.XXXXXX")"
    cleanup_paths+=("$log")
    echo "downloading $url -> $zip"
    # On a terminal the downloader shows its progress and errors itself; otherwise its messages go
    # to a log whose last line becomes the reason in our one-line error.
    status=0
    if command -v curl > /dev/null 2>&1; then
        options=(--fail --location --retry "$retries" --retry-delay 2 --connect-timeout 30 --output "$part")
        if [ -t 2 ]; then
            curl "${options[@]}" --progress-bar "$url" || status=$?
        else
            curl "${options[@]}" --silent --show-error "$url" 2> "$log" || status=$?
        fi
    elif command -v wget > /dev/null 2>&1; then
        options=(--tries="$retries" --timeout=30 --output-document="$part")
        if [ -t 2 ]; then
            wget "${options[@]}" "$url" || status=$?
        else
            wget "${options[@]}" --no-verbose "$url" 2> "$log" || status=$?
        fi
    else
        echo "neither curl nor wget is installed" > "$log"
        status=127
    fi
    if [ "$status" -ne 0 ]; then
        reason="$(grep -v '^[[:space:]]*$' "$log" | tail -n 1 | tr -d '\r' || true)"
        err "could not download $url${reason:+ ($reason)}; download it by hand and put it at $zip, then run this again"
        exit 1
    fi
    have_md5="$(md5_of "$part")"
    if [ "$have_md5" != "$expected_md5" ]; then
        err "the file downloaded from $url has md5 $have_md5, expected $expected_md5 (a damaged or changed download); it was deleted, try again or put the official zip at $zip"
        exit 1
    fi
    mv -f "$part" "$zip"
    echo "$zip: md5 verified"
fi

# 2. Unpack it, unless that was done before.
if [ -f "$dir/$raw_file" ]; then
    echo "$dir/$raw_file is ready"
    exit 0
fi
unpack_dir="$dir/.unpack.$$"
cleanup_paths+=("$unpack_dir")
rm -rf "$unpack_dir"
mkdir "$unpack_dir"
if command -v unzip > /dev/null 2>&1; then
    unzip -q -o "$zip" -d "$unpack_dir" || { err "cannot unpack $zip (is it a zip?)"; exit 1; }
else
    "$(python_cmd)" -m zipfile -e "$zip" "$unpack_dir" || { err "cannot unpack $zip (is it a zip?)"; exit 1; }
fi
if [ ! -f "$unpack_dir/$raw_file" ]; then
    err "$zip does not contain $raw_file"
    exit 1
fi
top="${raw_file%%/*}"
if [ ! -e "$dir/$top" ]; then
    mv "$unpack_dir/$top" "$dir/$top"
else
    # A folder from an earlier or partial unpack: replace what the zip holds, the ratings file last.
    for entry in "$unpack_dir/$top"/* "$unpack_dir/$top"/.[!.]*; do
        [ -e "$entry" ] || continue
        [ "$entry" = "$unpack_dir/$raw_file" ] && continue
        rm -rf "${dir:?}/$top/$(basename "$entry")"
        mv "$entry" "$dir/$top/"
    done
    mv -f "$unpack_dir/$raw_file" "$dir/$raw_file"
fi
echo "$dir/$raw_file is ready"
