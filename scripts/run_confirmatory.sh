#!/usr/bin/env bash
# Every number of the confirmatory study (docs/results/confirmatory/), in one command:
#   bash scripts/run_confirmatory.sh [OUT]        (default OUT: runs)
# Restores the committed part archives (docs/results/confirmatory/parts/*.tar.xz) where present, runs
# whatever is missing (grid.yaml parts 1-7, then sync.grid.yaml), checks run health, and writes both
# grids' reports; OUT/confirmatory/report.md holds the primary family (H1-H4) and the declared
# secondary family S1-S9 (S9 reads OUT/confirmatory-sync). Finished runs are skipped and interrupted
# ones resumed, so it can be stopped and restarted at any point. About 7 h on 2 cores from nothing.
# The runs use the study's frozen code (commit STUDY_COMMIT, the pre-registration's "code fixed at
# the first run"), checked out as a detached git worktree so each run's machine.json records it;
# health checks and reports use this checkout.
# Between parts the grid report compare writes is deleted unread (the stopping rule).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs}
DOCS=docs/results/confirmatory
STUDY_COMMIT=c891ba9
PY=${PYTHON:-.venv/bin/python}
CODE="$OUT/.confirmatory-code-$STUDY_COMMIT"
[ -d "$CODE/src" ] || git worktree add --detach "$CODE" "$STUDY_COMMIT"
CODE=$(cd "$CODE" && pwd)
frozen() { PYTHONPATH="$CODE/src" OMP_NUM_THREADS=1 "$PY" -m tokentrust.cli "$@"; }
unread() { rm -rf "$1/report.md" "$1/summary.csv" "$1/plots"; }
mkdir -p "$OUT/confirmatory" "$OUT/confirmatory-sync"
for archive in "$DOCS"/parts/*.tar.xz; do
  [ -e "$archive" ] || continue
  case "$(basename "$archive")" in
    sync*) tar -xJf "$archive" -C "$OUT/confirmatory-sync" ;;
    *) tar -xJf "$archive" -C "$OUT/confirmatory" ;;
  esac
done
for part in 1 2 3 4 5 6 7; do
  frozen compare --config "$DOCS/grid.yaml" --out "$OUT/confirmatory" --part "$part" --quiet
  unread "$OUT/confirmatory"
  "$PY" scripts/study_part.py health "$OUT/confirmatory" --config "$DOCS/grid.yaml" --part "$part"
done
frozen compare --config "$DOCS/sync.grid.yaml" --out "$OUT/confirmatory-sync" --quiet
unread "$OUT/confirmatory-sync"
"$PY" scripts/study_part.py health "$OUT/confirmatory-sync" --config "$DOCS/sync.grid.yaml"
"$PY" -m tokentrust.cli report "$OUT/confirmatory-sync"
"$PY" -m tokentrust.cli report "$OUT/confirmatory"
"$PY" scripts/hybrid_test.py "$OUT/confirmatory" --out "$OUT/confirmatory/hybrid-test.md"
