#!/usr/bin/env bash
# OPO against GRPO, DAPO, GSPO and online DPO, 3 seeds each: `opo train sweep=methods`, 15 runs
# in one sweep folder (one W&B group), then `opo report` on it: reward and gradient-norm
# curves of every run and a summary table (final reward, steps to threshold) per method x seed.
#
#   scripts/compare_methods_sweep.sh cpu [overrides]   # embedded default: model=tiny dataset=arith,
#       2 runs at a time (joblib): about 8-12 min on 2 CPU cores (estimated from the measured
#       alpha x mu sweep: 9 OPO runs in 4 min 40 s; DAPO samples extra rounds, DPO a reference)
#   scripts/compare_methods_sweep.sh gpu [overrides]   # paper scale: +experiment=paper_exp1,
#       runs one after another on one GPU: ~4 h a run, ~2.5 days in all (an estimate)
#   scripts/compare_methods_sweep.sh gpu hydra/launcher=slurm_gpu hydra.launcher.partition=gpu
#       15 SLURM jobs of one GPU each, requeued on preemption: ~4 h when 15 GPUs are free
#
# Extra arguments are Hydra overrides given to every run; a later one wins (logger=none,
# seed=0 for one seed, method=opo,grpo for two methods). SWEEP_DIR names the sweep folder
# (default outputs/sweeps/methods_<scale>_<date>_<time>); its name is the W&B group.
set -euo pipefail

scale=${1:-cpu}
shift || true
sweep_dir=${SWEEP_DIR:-outputs/sweeps/methods_${scale}_$(date +%Y-%m-%d_%H-%M-%S)}
case $scale in
  cpu) setup=(model=tiny dataset=arith hydra/launcher=joblib hydra.launcher.n_jobs=2) ;;
  gpu) setup=(+experiment=paper_exp1) ;;
  *) echo "usage: $0 [cpu|gpu] [overrides ...]" >&2; exit 2 ;;
esac

time opo train sweep=methods "${setup[@]}" "hydra.sweep.dir=$sweep_dir" "$@"
opo report "$sweep_dir"
