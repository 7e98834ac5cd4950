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
# The work is done by scripts/run_sweep.sh.
exec "$(dirname "$0")/run_sweep.sh" methods "$@"
