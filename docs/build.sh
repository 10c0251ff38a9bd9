#!/usr/bin/env bash
# Builds the documentation website into artifacts/docs (git-ignored) with fsdocs (a local dotnet
# tool, .config/dotnet-tools.json): the pages of docs/, the tutorials getting-started.fsx and
# custom-flow.fsx with their outputs (--eval), and the API reference from the XML docs of
# MixerFlow.Core, MixerFlow.Checks, MixerFlow.Host and MixerFlow.CommandLine. --strict: a problem
# generating the docs fails the build. fsdocs shows a tutorial's exception in the page without
# failing, so each tutorial first runs alone under `dotnet fsi`, where an exception (a failed
# check at its end) is a non-zero exit.
#   bash docs/build.sh              build the projects, then the site (open artifacts/docs/index.html)
#   bash docs/build.sh --no-build   the projects are built already (Debug), as in .ci/run
set -euo pipefail
cd "$(dirname "$0")/.."
projects=(src/MixerFlow.Core/MixerFlow.Core.fsproj src/MixerFlow.Checks/MixerFlow.Checks.fsproj
          src/MixerFlow.Host/MixerFlow.Host.csproj src/MixerFlow.CommandLine/MixerFlow.CommandLine.fsproj)
tutorials=(docs/getting-started.fsx docs/custom-flow.fsx)
dotnet tool restore
if [ "${1:-}" != "--no-build" ]; then
  # The API reference reads the built assemblies and their XML docs; the tutorials load
  # examples/CustomFlow's output (MixerFlow.Core, MixerFlow.Checks and the LibTorch natives).
  for p in "${projects[@]}" examples/CustomFlow/CustomFlow.csproj; do dotnet build "$p" -c Debug; done
fi
for t in "${tutorials[@]}"; do
  echo "== $t"
  dotnet fsi --quiet --exec "$t"
done
rm -rf artifacts/docs .fsdocs
dotnet fsdocs build --strict --eval --input docs --output artifacts/docs \
  --projects "${projects[@]}" --properties Configuration=Debug \
  --parameters fsdocs-collection-name MixerFlow.NET
test -s artifacts/docs/index.html || { echo "docs: no index.html" >&2; exit 1; }
for page in getting-started custom-flow cli library benchmarks; do
  test -s "artifacts/docs/$page.html" || { echo "docs: no $page.html" >&2; exit 1; }
done
for type in mixerflow-core-flows mixerflow-checks-bijectorchecks mixerflow-host-models-imageflow mixerflow-commandline-commandline; do
  test -s "artifacts/docs/reference/$type.html" || { echo "docs: no API reference page $type.html" >&2; exit 1; }
done
# The tutorials' outputs are in their pages.
grep -q "held-out NLL: [0-9]" artifacts/docs/getting-started.html || { echo "docs: getting-started.html lacks its output" >&2; exit 1; }
echo "docs: artifacts/docs/index.html"
