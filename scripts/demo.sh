#!/usr/bin/env bash
# The whole DeepAlign pipeline on the embedded demo (simulated from the shipped 70S ribosome map).
# Run by `make demo`; every step is a plain `deepalign` call you can copy.
set -euo pipefail
cd "$(dirname "$0")/.."
DA=${DA:-.venv/bin/deepalign}
P=${DEMO_PROJECT:-demo_project}
CFG=configs/demo.yaml
rm -rf "$P"
start=$(date +%s)
$DA simulate "$P" --config $CFG                                  # particles + truth + 10 % pre-aligned subset
$DA label "$P" --subset "$P/simulated/subset.star" --config $CFG  # region of every pre-aligned particle
$DA reconstruct "$P" --from "$P/label/labels.star" --out reference --config $CFG   # the paper's reference: the subset's map
$DA train "$P" --config $CFG                                      # region classifier (+ examples made from the reference)
$DA predict "$P" --config $CFG                                    # likely regions of every particle
$DA align "$P" --config $CFG                                      # correlation search inside the top-2 regions
$DA reconstruct "$P" --config $CFG                                # map + half-map FSC of the aligned particles
$DA refine "$P" --config $CFG                                     # gold-standard local refinement up to the full 64-px box
$DA align "$P" --config $CFG --exhaustive                         # second pose set: whole-sphere search (baseline)
$DA consensus "$P/align/aligned.star" "$P/align_exhaustive/aligned.star" --threshold 5 --project "$P"
$DA reconstruct-args "$P" --program relion > /dev/null
$DA report "$P"
echo "demo finished in $(( $(date +%s) - start )) s; results in $P/ (report/report.md, */*.png)"
