#!/usr/bin/env bash
# A/B of train.synthetic_fraction (benchmarks/RESULTS.md, "Synthetic training examples"): the same
# simulated project trained on its labelled particles alone and with a share SYN of every batch synthetic,
# then predict --coverage 0.95 and report --truth (held-out hit rates in WORK/TAG_synN/report/report.md).
#   N=3000 SNR=0.05 SYN=0.9 NOISE=white|mic MODEL=polar_trunk|per_region EPOCHS=6 IPR=1024 TAG=w benchmarks/experiments/synthetic_ab.sh
# COUNTS="0.9": the synthetic shares to run (default "0 SYN"). (SYNNOISE=particles ran the A/B of the
# particle-noise variant, removed after it lost: RESULTS.md, commit history.)
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
DA="$ROOT/.venv/bin/deepalign"
MIC="$ROOT/../shared/data/micrograph_noise/fei_extended_1.668A_1024.mrc"
WORK=${WORK:-/tmp/syn}; mkdir -p "$WORK"
N=${N:-3000}; SNR=${SNR:-0.05}; SYN=${SYN:-0.9}; NOISE=${NOISE:-mic}; TAG=${TAG:-a}
P0=$WORK/base_${TAG}
if [ ! -d $P0 ]; then
  extra=""; [ "$NOISE" = mic ] && extra="--noise-micrograph $MIC"
  $DA simulate $P0 --n-particles $N --snr $SNR --pre-aligned-fraction 0.1 --seed 11 $extra > /dev/null
  $DA label $P0 --subset $P0/simulated/subset.star > /dev/null
fi
for syn in ${COUNTS:-0 $SYN}; do
  P=$WORK/${TAG}_syn$syn; rm -rf $P; cp -r $P0 $P; sed -i "s#$P0#$P#g" $P/project.yaml
  printf "preprocess:\n  target_resolution_ang: 30.0\ntrain:\n  model: ${MODEL:-polar_trunk}\n  epochs: ${EPOCHS:-6}\n  images_per_region: ${IPR:-1024}\n  synthetic_fraction: $syn\npredict:\n  coverage: 0.95\n" > $P/cfg.yaml
  /usr/bin/time -f "train %e s" $DA train $P --config $P/cfg.yaml 2>&1 | grep -E "synthetic|trained|train [0-9.]+ s" 
  $DA predict $P --config $P/cfg.yaml 2>&1 | tail -1
  $DA report $P --truth $P/simulated/truth.star > $P/report.txt 2>&1 || true
  grep -A8 "held-out" $P/report/report.md | head -9
done
