#!/bin/sh
# The long fuzz run of docs/reliability.md: >= 10^6 inputs over the three
# targets, coverage-guided (atheris), two targets at a time.
#
#   pip install '.[fuzz]'            # or: PYTHONPATH=src with atheris installed
#   sh fuzz/long-run.sh [OUT_DIR]    # default /tmp/vfiosim-fuzz
#
# Each target starts from the seed corpus in fuzz/corpus/<target> and grows
# its own corpus in OUT_DIR/<target>; crashing inputs go to OUT_DIR/crashes.
# Prints, per target, libFuzzer's "Done N runs in S second(s)", then the total
# and the number of crashes.  Environment: IOCTL_RUNS, PROTOCOL_RUNS,
# MACHINE_FILE_RUNS (defaults 600000, 250000, 250000), VFIOSIM (the command,
# default "python3 -m vfiosim.cli").
set -u
OUT=${1:-/tmp/vfiosim-fuzz}
VFIOSIM=${VFIOSIM:-python3 -m vfiosim.cli}
mkdir -p "$OUT/crashes"
run() {   # target runs
    $VFIOSIM fuzz "$1" --engine atheris --runs "$2" --max-len 4096 --seed 1 \
        --work "$OUT/$1" --crashes "$OUT/crashes" > "$OUT/$1.log" 2>&1
}
start=$(date +%s)
run ioctl "${IOCTL_RUNS:-600000}" &
ioctl=$!
run protocol "${PROTOCOL_RUNS:-250000}"
run machine-file "${MACHINE_FILE_RUNS:-250000}"
wait $ioctl
end=$(date +%s)
total=0
for t in ioctl protocol machine-file; do
    line=$(grep -a "^Done [0-9]* runs" "$OUT/$t.log" | tail -1)
    echo "$t: ${line:-no summary (see $OUT/$t.log)}"
    n=$(echo "$line" | sed -n 's/^Done \([0-9]*\) runs.*/\1/p')
    total=$((total + ${n:-0}))
done
crashes=$(ls "$OUT/crashes" | wc -l)
echo "total: $total inputs in $((end - start)) s (wall clock), $crashes crash(es)"
[ "$crashes" -eq 0 ]
