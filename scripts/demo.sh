#!/usr/bin/env bash
# Installs what the demo needs (apt + pinned pip), then dubs the sample catalogue
# end to end on a local Ray with a tiny random weights bundle.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec .venv/bin/imgtalk demo "$@"
