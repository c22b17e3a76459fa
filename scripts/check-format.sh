#!/usr/bin/env bash
# Checks that every tracked C, C++ and CUDA file is formatted as .clang-format says (clang-format 14).
#   scripts/check-format.sh          list the files that differ and exit 1 if any does
#   scripts/check-format.sh --fix    rewrite them in place
set -euo pipefail
cd "$(dirname "$0")/.."
command -v clang-format >/dev/null || { echo "check-format: clang-format not found (apt-get install clang-format)"; exit 2; }
mapfile -t files < <(git ls-files '*.h' '*.hpp' '*.c' '*.cc' '*.cpp' '*.cu' '*.cuh')
if [ "${1:-}" = --fix ]; then
  clang-format -i "${files[@]}"
  exit 0
fi
bad=()
for f in "${files[@]}"; do
  clang-format --dry-run --Werror "$f" >/dev/null 2>&1 || bad+=("$f")
done
if [ ${#bad[@]} -gt 0 ]; then
  echo "check-format: ${#bad[@]} of ${#files[@]} files are not formatted as .clang-format says ($(clang-format --version)):"
  printf '  %s\n' "${bad[@]}"
  echo "fix with: scripts/check-format.sh --fix"
  exit 1
fi
echo "check-format: ${#files[@]} files formatted ($(clang-format --version | head -1))"
