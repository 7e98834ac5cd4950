#!/usr/bin/env bash
# Runs one sweep file of conf/sweep/ at CPU or paper scale, then `opo report` on its folder.
# Called by ablation_alpha_mu.sh and compare_methods_sweep.sh (their headers give run times).
#
#   scripts/run_sweep.sh SWEEP [cpu|gpu] [overrides ...]
#
# cpu: the embedded default (model=tiny dataset=arith), 2 runs at a time (joblib);
# gpu: +experiment=paper_exp1. Extra arguments are Hydra overrides given to every run; a later
# one wins. SWEEP_DIR names the sweep folder (default outputs/sweeps/SWEEP_<scale>_<date>_<time>);
# its name is the W&B group.
set -euo pipefail

sweep=${1:?usage: $0 SWEEP [cpu|gpu] [overrides ...]}
scale=${2:-cpu}
shift 2 || shift || true
sweep_dir=${SWEEP_DIR:-outputs/sweeps/${sweep}_${scale}_$(date +%Y-%m-%d_%H-%M-%S)}
case $scale in
  cpu) setup=(model=tiny dataset=arith hydra/launcher=joblib hydra.launcher.n_jobs=2) ;;
  gpu) setup=(+experiment=paper_exp1) ;;
  *) echo "usage: $0 SWEEP [cpu|gpu] [overrides ...]" >&2; exit 2 ;;
esac

time opo train "sweep=$sweep" "${setup[@]}" "hydra.sweep.dir=$sweep_dir" "$@"
opo report "$sweep_dir"
