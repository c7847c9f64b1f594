#!/usr/bin/env bash
# The main job on an embedded default: distil a PixArt teacher whose answer is known exactly (a caption-conditioned
# Gaussian mixture in latent space, `sim_diffusers.ground_truth`) into a one-step generator with the real trainer
# (`accelerate launch training_scripts/train_sim_pixart.py`), load it with SIMOneStepPipeline.from_pretrained, and
# print how close it gets: prompt fidelity, mode coverage, mode-weight error, MMD, next to the teacher's samplers.
# The teacher is trained once (about a minute) and cached under ~/.cache/sim_diffusers/ground_truth/ (or
# $SIM_DIFFUSERS_CACHE/ground_truth/). A few minutes on 2 cores. docs/ground_truth.md explains the table.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
out=${1:-outputs/demo}
.venv/bin/python -m benchmarks.ground_truth.distill --world quick --max_train_steps 300 --eval_every 100 \
    --num_samples 128 --baselines --name demo --output_dir "$out" -- --regression_warmup_steps 200
# Two images from the distilled pipeline. generate.py's loading bars (stderr) go to a log, shown only if it fails, so
# that the table above stays what the screen ends with.
.venv/bin/python examples/generate.py --model "$out/runs/demo-seed0" --output_dir "$out/images" \
    --no_resolution_binning "a red circle" "a blue square" 2> "$out/generate.log" \
    || { cat "$out/generate.log" >&2; exit 1; }
echo "Pipeline: $out/runs/demo-seed0 (SIMOneStepPipeline.from_pretrained), table: $out/demo.md, figure: $out/demo.png"
