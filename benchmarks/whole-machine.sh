#!/usr/bin/env bash
# The whole machine for one model: training images/s with one process on 1 and N LibTorch threads,
# and N MPI ranks (mpiexec, MPICH) of 1 and of N threads each, at the same global batch. Configurations
# are interleaved in each round; the table gives each one's median and range of images/s over the
# rounds (summary.json's training-step rate) and its CPU seconds per step (user + system of all
# processes, from /usr/bin/time, whole command included), under a header with command, commit,
# machine and date.
#   benchmarks/whole-machine.sh [--preset P] [--set k=v]... [--data DIR] [--steps S] [--batch B] [--rounds R] [--ranks N] [--out FILE]
set -euo pipefail
cd "$(dirname "$0")/.."
preset=fashion-mnist-quality; data=""; steps=300; batch=64; rounds=3; ranks=$(nproc); out=""; sets=()
args="$*"
while [ $# -gt 0 ]; do
  case "$1" in
    --preset) preset=$2; shift 2;; --set) sets+=(--set "$2"); shift 2;; --data) data=$2; shift 2;;
    --steps) steps=$2; shift 2;; --batch) batch=$2; shift 2;; --rounds) rounds=$2; shift 2;;
    --ranks) ranks=$2; shift 2;; --out) out=$2; shift 2;;
    *) echo "whole-machine.sh: unknown option '$1'" >&2; exit 2;;
  esac
done
if [ $((batch % ranks)) -ne 0 ]; then echo "whole-machine.sh: --batch $batch is not divisible by --ranks $ranks" >&2; exit 2; fi
mpiexec=$(command -v mpiexec.mpich || command -v mpiexec.hydra || true)
[ -n "$mpiexec" ] || { echo "whole-machine.sh: needs MPICH's mpiexec (apt-get install mpich)" >&2; exit 2; }
dotnet build src/MixerFlow.Cli -c Release -v q -nologo >/dev/null
# The commit the binaries were built from (HEAD may move while the rounds run).
commit="$(git rev-parse --short HEAD)$(git diff --quiet HEAD -- src || echo ' (with uncommitted changes)')"
cli=src/MixerFlow.Cli/bin/Release/net10.0/mixerflow.dll
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
dataArgs=(); [ -n "$data" ] && dataArgs=(--data "$data")
per=$((batch / ranks))
# name|processes|threads per process|batch per process
configs=("1 process, 1 thread|1|1|$batch" "1 process, $ranks threads|1|$ranks|$batch" "$ranks ranks, 1 thread each|$ranks|1|$per" "$ranks ranks, $ranks threads each|$ranks|$ranks|$per")
for ((r = 1; r <= rounds; r++)); do
  for i in "${!configs[@]}"; do
    IFS='|' read -r name procs threads b <<< "${configs[$i]}"
    dir="$work/c$i-r$r"
    cmd=(dotnet "$cli" train --preset "$preset" "${sets[@]}" "${dataArgs[@]}" --steps "$steps" --batch-size "$b" --threads "$threads" --checkpoint-every "$steps" --out "$dir")
    [ "$procs" -gt 1 ] && cmd=("$mpiexec" -n "$procs" "${cmd[@]}")
    /usr/bin/time -f "%U %S" -o "$dir.time" "${cmd[@]}" > "$dir.log" 2>&1 || { echo "whole-machine.sh: '$name' failed, see below" >&2; tail -20 "$dir.log" >&2; exit 1; }
    ips=$(python3 -c "import json;print(json.load(open('$dir/summary.json'))['imagesPerSecond'])")
    cpu=$(awk -v s="$steps" '{print ($1 + $2) / s}' "$dir.time")
    echo "$i|$ips|$cpu" >> "$work/results"
    echo "round $r: $name: $(printf '%.0f' "$ips") images/s" >&2
  done
done
table=$(python3 - "$work/results" "${configs[@]}" <<'PY'
import sys, statistics
rows = [l.strip().split('|') for l in open(sys.argv[1])]
names = [c.split('|')[0] for c in sys.argv[2:]]
print("| configuration | images/s, median | range | CPU s per step, median |")
print("| --- | ---: | ---: | ---: |")
for i, n in enumerate(names):
    ips = [float(r[1]) for r in rows if int(r[0]) == i]
    cpu = [float(r[2]) for r in rows if int(r[0]) == i]
    print(f"| {n} | {statistics.median(ips):.0f} | {min(ips):.0f}-{max(ips):.0f} | {statistics.median(cpu):.3f} |")
PY
)
header="command: benchmarks/whole-machine.sh $args
commit: $commit
machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), load average at the end $(cut -d' ' -f1-3 /proc/loadavg)
date: $(date -u +%FT%TZ)
model: $preset ${sets[*]}; global batch $batch; $steps steps per run; $rounds rounds, configurations interleaved"
if [ -n "$out" ]; then
  printf '# Whole-machine training speed\n\n```text\n%s\n```\n\n%s\n' "$header" "$table" > "$out"
  echo "wrote $out" >&2
fi
printf '%s\n\n%s\n' "$header" "$table"
