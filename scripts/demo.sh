#!/usr/bin/env bash
# The main job on an embedded default (replaced by the trainer run once it lands): build a tiny PixArt-alpha
# teacher, start a one-step pipeline from it and generate images.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
out=${1:-outputs/demo}
.venv/bin/python - "$out" <<'PY'
import sys
from sim_diffusers import SIMOneStepPipeline
from sim_diffusers.testing import build_tiny_pixart_pipeline
out = sys.argv[1]
teacher = build_tiny_pixart_pipeline(f"{out}/teacher")
SIMOneStepPipeline.from_teacher(teacher).save_pretrained(f"{out}/sim")
PY
.venv/bin/python examples/generate.py --model "$out/sim" --output_dir "$out/images" "a red cat" "a blue dog"
