#!/usr/bin/env bash
# Rebuild docs/findings.md's generated block and the full report from the committed runs (seconds).
set -euo pipefail
cd "$(dirname "$0")/.."
tl-strace report findings/runs/*/* --out findings/report/report --findings docs/findings.md
