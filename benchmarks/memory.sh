#!/usr/bin/env bash
# Memory benchmark of the training loop: resident memory and live tensors (TorchSharp's
# dispose-scope statistics) after 100 and after 1,000 steps of the fashion-mnist preset.
# Target: memory after 1,000 steps within 10% of memory after 100, and no live-tensor growth.
#   bash benchmarks/memory.sh            (about a minute on 2 cores)
set -euo pipefail
cd "$(dirname "$0")/.."
out=$(mktemp -d)
dotnet run --project src/MixerFlow.Cli -c Release -- train --preset fashion-mnist --steps 1000 --out "$out/run" > "$out/log"
python3 - "$out/run/metrics.csv" <<'PY'
import csv, sys
rows = [r for r in csv.DictReader(open(sys.argv[1])) if r["heldout_bpd"] == ""]
at = {int(r["step"]): r for r in rows}
rss100, rss1000 = float(at[100]["rss_mb"]), float(at[1000]["rss_mb"])
live100, live1000 = int(at[100]["live_tensors"]), int(at[1000]["live_tensors"])
print(f"resident memory: {rss100:.1f} MB after 100 steps, {rss1000:.1f} MB after 1000 ({rss1000 / rss100 - 1:+.1%})")
print(f"live tensors:    {live100} after 100 steps, {live1000} after 1000")
ok = rss1000 <= 1.10 * rss100 and live1000 == live100
print("PASS" if ok else "FAIL")
sys.exit(0 if ok else 1)
PY
rm -rf "$out"
