#!/usr/bin/env bash
# Sets up (scripts/setup.sh) and runs mergec's main job on a bundled default, no download.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/mergec demo "$@"
