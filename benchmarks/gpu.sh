#!/usr/bin/env bash
# GPU numbers in one run of a few minutes, on a machine with a CUDA device and the project
# installed (`make install` with a CUDA build of torch 2.13.0, or the attribution-ray:*-gpu image):
#
#   1. tests/gpu                      the CUDA tests (featurizer, index job, endpoint on the GPU)
#   2. attribution plan               on a Stable Diffusion 1.5-shaped pipeline (random weights,
#                                     fp16 files) with a rank-8 LoRA on its UNet and text encoder,
#                                     the featurize settings of deploy/cluster.yaml
#   3. attribution bench featurize    --scale sd15: featurize time / a training step at SD 1.5's shapes
#   4. attribution bench serve        the endpoint over HTTP with the featurizer on the GPU
#
# Every step writes STEP.json (its result) and STEP.log under $OUT (default artifacts/gpu);
# summary.json gathers them with the device's name, and the exit status is the number of steps
# that failed. A step that fails does not stop the others.
#
#   benchmarks/gpu.sh                    the GPU run
#   QUICK=1 benchmarks/gpu.sh            small sizes, to try the script on a CPU machine first
#   PYTHON=/path/to/python OUT=dir ...   another environment or output folder
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
OUT=${OUT:-artifacts/gpu}
QUICK=${QUICK:-0}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu-bench.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
export RAY_USAGE_STATS_ENABLED=0 HF_HUB_OFFLINE=1 RAY_AUTH_MODE=${RAY_AUTH_MODE:-disabled}
ATTRIBUTION=("$PYTHON" -m pipelines.cli --log-level WARNING)
failed=0

step() {  # step NAME TIMEOUT_S COMMAND... : stdout -> NAME.json, stderr -> NAME.log
  local name=$1 limit=$2; shift 2
  local start=$SECONDS
  echo "== $name (at most ${limit} s)" >&2
  timeout "$limit" "$@" > "$OUT/$name.json" 2> "$OUT/$name.log"
  local rc=$?
  echo "   rc $rc, $((SECONDS - start)) s" >&2
  echo "{\"rc\": $rc, \"seconds\": $((SECONDS - start))}" > "$OUT/$name.status.json"
  [ "$rc" = 0 ] || failed=$((failed + 1))
}

"$PYTHON" - > "$OUT/device.json" <<'EOF'
import json, platform, torch
cuda = torch.cuda.is_available()
print(json.dumps({"device": torch.cuda.get_device_name() if cuda else f"cpu ({platform.processor() or platform.machine()})",
                  "cuda": cuda, "torch": torch.__version__, "cuda_version": torch.version.cuda,
                  "memory_gib": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1) if cuda else None}))
EOF
echo "device: $(cat "$OUT/device.json")" >&2

# 1. the CUDA tests (skipped, not failed, without CUDA)
step tests-gpu 420 "$PYTHON" -m pytest tests/gpu -q -p no:cacheprovider -o addopts="" --junitxml="$OUT/tests-gpu.xml"

# 2. the plan, on an SD 1.5-shaped base with a LoRA as diffusers' training scripts save one
if [ "$QUICK" = 1 ]; then ROWS=100000; DEVICES=2; BATCHES=1; TIMESTEPS=2; EXAMPLES=1; BATCH=2; else
  ROWS=2000000; DEVICES=8; BATCHES=3; TIMESTEPS=10; EXAMPLES=4; BATCH=64; fi
"$PYTHON" - "$WORK" "$TIMESTEPS" "$BATCH" > "$OUT/models.log" 2>&1 <<'EOF'
import sys
from pathlib import Path

import torch
import yaml
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model
from diffusers import StableDiffusionPipeline
from diffusers.utils import convert_state_dict_to_diffusers

from attribution_core.models.pipeline_dir import load_adapter
from attribution_core.models.tiny import build_sd15_pipeline

work, timesteps, batch = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
base = build_sd15_pipeline(work / "sd15", variant="fp16")
adapter = load_adapter(str(base))
layers = {}
for key, module, targets in (("unet_lora_layers", adapter.denoiser, ["to_k", "to_q", "to_v", "to_out.0"]),
                             ("text_encoder_lora_layers", adapter.text_encoder, ["q_proj", "k_proj", "v_proj", "out_proj"])):
    inject_adapter_in_model(LoraConfig(r=8, lora_alpha=8, init_lora_weights="gaussian", target_modules=targets), module)
    layers[key] = convert_state_dict_to_diffusers(get_peft_model_state_dict(module))
StableDiffusionPipeline.save_lora_weights(work / "lora", **layers)
cfg = yaml.safe_load(Path("deploy/cluster.yaml").read_text())
config = {"model": {"path": str(work / "lora"), "base": str(base), "device": "auto"},
          "featurize": {**cfg["featurize"], "timesteps": {**cfg["featurize"]["timesteps"], "count": timesteps}},
          "index": {**{k: v for k, v in cfg["index"].items() if k not in ("out", "caption_column")},
                    "batch_size": batch},
          "serve": {"threads": 4}}
(work / "plan.yaml").write_text(yaml.safe_dump(config))
print("wrote", work / "plan.yaml")
EOF
if [ -f "$WORK/plan.yaml" ]; then
  step plan 600 "${ATTRIBUTION[@]}" plan --config "$WORK/plan.yaml" --rows "$ROWS" --devices "$DEVICES" \
    --batches "$BATCHES" --json
else
  echo "   building the SD 1.5-shaped pipeline failed: $OUT/models.log" >&2; failed=$((failed + 1))
fi

# 3. featurize / training step at SD 1.5's shapes
step featurize-sd15 600 "${ATTRIBUTION[@]}" bench featurize --scale sd15 --examples "$EXAMPLES" --json

# 4. the endpoint, its featurizer on the GPU
if [ "$QUICK" = 1 ]; then SERVE=(--n 2000 --concurrency 1 8 --requests 8 16); else
  SERVE=(--n 10000 100000 --concurrency 1 8 --requests 60 160); fi
step serve 600 "${ATTRIBUTION[@]}" bench serve "${SERVE[@]}" --work "$WORK/serve" --json

"$PYTHON" - "$OUT" <<'EOF'
import json, sys
from pathlib import Path

out = Path(sys.argv[1])
summary = {"device": json.loads((out / "device.json").read_text())}
for name in ("tests-gpu", "plan", "featurize-sd15", "serve"):
    status = out / f"{name}.status.json"
    entry = json.loads(status.read_text()) if status.exists() else {"rc": None}
    try:
        entry["result"] = json.loads((out / f"{name}.json").read_text())
    except (OSError, json.JSONDecodeError):
        tail = (out / f"{name}.log").read_text().splitlines()[-5:] if (out / f"{name}.log").exists() else []
        entry["result"], entry["log_tail"] = None, tail
    summary[name] = entry
xml = out / "tests-gpu.xml"
if xml.exists():
    import xml.etree.ElementTree as ET
    suite = ET.parse(xml).getroot()
    suite = suite if suite.tag == "testsuite" else suite[0]
    summary["tests-gpu"]["result"] = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
(out / "summary.json").write_text(json.dumps(summary, indent=2))
print(json.dumps(summary, indent=2))
EOF
echo "failed steps: $failed" >&2
exit "$failed"
