#!/usr/bin/env bash
# The paper's claims, measured with seeds: every method x 3 seeds and the alpha x mu grid x
# 3 seeds, then one `opo report` over both sweeps (docs/paper.md shows what it gave).
#
#   scripts/reproduce_paper.sh cpu [overrides]   # the embedded task dataset=arith_hard on the
#       tiny model, 200 steps a run, 2 runs at a time (joblib): 21 + 27 = 48 runs in 33 min
#       measured on 2 CPU cores under load 7-14 (other jobs); 15-20 min estimated on quiet
#       ones (docs/paper.md)
#   scripts/reproduce_paper.sh gpu [overrides]   # the paper's scale: the same two sweeps with
#       +experiment=paper_exp1 (Qwen3-1.7B, MATH Level 3, 224 steps) and the methods again with
#       +experiment=paper_exp2 (27 steps); one run after another on one GPU unless a launcher
#       is given (hydra/launcher=slurm_gpu hydra.launcher.partition=gpu); cost in docs/paper.md
#
# Extra arguments are Hydra overrides given to every run; a later one wins (trainer.steps=100,
# hydra.launcher.n_jobs=1). OUT names the output folder (default
# outputs/paper/<scale>_<date>_<time>): sweeps in OUT/methods, OUT/alpha_mu (and
# OUT/methods_exp2), the report in OUT/report. DRY_RUN=1 prints the commands, runs nothing.
set -euo pipefail

scale=${1:-}
shift || true
out=${OUT:-outputs/paper/${scale}_$(date +%Y-%m-%d_%H-%M-%S)}
case $scale in
  cpu)
    # lr 3e-4: at the tiny model's 1e-3 the reward stops climbing by step 60 (docs/paper.md)
    setup=(dataset=arith_hard trainer.steps=200 trainer.lr=3e-4 trainer.save_every=100
      eval.every=50 eval.limit=100 logger=none hydra/launcher=joblib hydra.launcher.n_jobs=2)
    sweeps=("paper_methods methods" "paper_alpha_mu alpha_mu")  # sweep file, folder, [extra]
    ;;
  gpu)
    setup=()
    sweeps=("paper_methods methods +experiment=paper_exp1"
      "paper_alpha_mu alpha_mu +experiment=paper_exp1"
      "paper_methods methods_exp2 +experiment=paper_exp2")
    ;;
  *) echo "usage: $0 cpu|gpu [overrides ...]" >&2; exit 2 ;;
esac

run() {  # prints the command; runs it unless DRY_RUN=1
  echo "+ $*"
  if [[ ${DRY_RUN:-0} != 1 ]]; then "$@"; fi
}

start=$(date +%s)
echo "# $(date -u '+%Y-%m-%d %H:%M:%S UTC') start; $(uptime)"
if [[ $scale == cpu ]]; then
  # build and warm-start the tiny model once, before two workers would both build it
  run opo train dataset=arith_hard trainer.steps=1 logger=none "hydra.run.dir=$out/tiny_build" "$@"
fi
dirs=()
for spec in "${sweeps[@]}"; do
  read -r sweep name extra <<<"$spec"
  run opo train "sweep=$sweep" ${extra:+"$extra"} ${setup[@]+"${setup[@]}"} \
    "hydra.sweep.dir=$out/$name" "$@"
  dirs+=("$out/$name")
done
run opo report "${dirs[@]}" "out_dir=$out/report"
echo "# $(date -u '+%Y-%m-%d %H:%M:%S UTC') done in $(($(date +%s) - start)) s; $(uptime)"
