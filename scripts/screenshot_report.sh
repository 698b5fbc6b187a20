#!/usr/bin/env bash
# Render a bpfree report.html in headless Chromium and write a full-page PNG, to look at
# what a user sees (tables fitting the page, plots readable) without a browser window.
#
#   scripts/screenshot_report.sh runs/demo/report.html [shot.png] [WIDTH] [HEIGHT]
#
# Defaults: shot.png next to the report, a 1300 x 6000 px window (the report's column is
# at most 1150 px wide; the height holds the whole demo report). Needs Debian's chromium
# (apt-get install -y chromium, as root). Exits 1 with the reason when Chromium is missing
# or writes no PNG.
set -euo pipefail
if [ $# -lt 1 ]; then
    echo "usage: $0 REPORT.html [OUT.png] [WIDTH] [HEIGHT]" >&2
    exit 2
fi
report="$(realpath "$1")"
[ -f "$report" ] || { echo "$0: no such file: $1" >&2; exit 1; }
out="${2:-$(dirname "$report")/shot.png}"
out="$(realpath -m "$out")"
width="${3:-1300}"
height="${4:-6000}"
browser="$(command -v chromium || command -v chromium-browser || command -v google-chrome || true)"
if [ -z "$browser" ]; then
    echo "$0: chromium not found; install it with: apt-get install -y chromium" >&2
    exit 1
fi
profile="$(mktemp -d)"
trap 'rm -rf "$profile"' EXIT
rm -f "$out"
"$browser" --headless --no-sandbox --disable-gpu --disable-background-networking --no-first-run \
    --hide-scrollbars --user-data-dir="$profile" --window-size="$width,$height" \
    --screenshot="$out" "file://$report" >/dev/null 2>&1 || true
[ -s "$out" ] || { echo "$0: chromium wrote no screenshot to $out" >&2; exit 1; }
echo "$out"
