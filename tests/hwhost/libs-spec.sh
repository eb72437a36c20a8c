#!/usr/bin/env bash
# Reads `ldd` output on stdin and prints mkcpio.py spec lines that put each
# shared library it names (and the dynamic loader) at the same path in an
# initramfs, parent directories first. Duplicates are left for the caller to
# drop (awk '!seen[$1 " " $2]++').
set -euo pipefail
awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\/lib(64)?\// { print $1 }' | sort -u |
    while read -r lib; do
        d=$(dirname "$lib")
        parts=()
        while [ "$d" != / ]; do parts=("$d" "${parts[@]}"); d=$(dirname "$d"); done
        for p in "${parts[@]}"; do echo "dir $p 0755 0 0"; done
        echo "file $lib $(readlink -f "$lib") 0755 0 0"
    done
