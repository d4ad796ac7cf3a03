#!/usr/bin/env bash
# Installs what the demo needs (apt + pinned pip), then dubs the sample catalogue (and
# held-out sentences of synthetic speakers) end to end on a local Ray with the trained tiny
# demo bundle (weights/demo), and prints the lip-sync figures of its outputs.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec .venv/bin/imgtalk demo "$@"
