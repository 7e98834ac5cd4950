#!/usr/bin/env bash
# The paper's alpha x mu ablation of OPO: alpha in {0.3, 0.6, 0.9} x mu in {0.5, 1.0, 2.0},
# 9 runs in one sweep folder (one W&B group), then `opo report` on it (docs/sweeps.md).
#
#   scripts/ablation_alpha_mu.sh cpu [overrides]   # embedded default: model=tiny dataset=arith,
#       2 runs at a time (joblib): 4 min 40 s measured on 2 busy CPU cores (tiny model cached;
#       its one-time build and warm start adds about 4 CPU-minutes)
#   scripts/ablation_alpha_mu.sh gpu [overrides]   # paper scale: +experiment=paper_exp1 (Qwen3-1.7B,
#       MATH Level 3, 224 steps), runs one after another on one GPU: ~4 h a run, ~1.5 days in all
#       (an estimate, not a measurement); spread them over a cluster with
#   scripts/ablation_alpha_mu.sh gpu hydra/launcher=slurm_gpu hydra.launcher.partition=gpu
#       9 SLURM jobs of one GPU each, requeued on preemption: ~4 h when 9 GPUs are free
#
# Extra arguments are Hydra overrides given to every run; a later one wins (logger=none,
# trainer.steps=50, hydra.launcher.n_jobs=1). SWEEP_DIR names the sweep folder (default
# outputs/sweeps/alpha_mu_<scale>_<date>_<time>); its name is the W&B group.
# The work is done by scripts/run_sweep.sh.
exec "$(dirname "$0")/run_sweep.sh" alpha_mu "$@"
