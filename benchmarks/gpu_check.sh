#!/usr/bin/env bash
# The GPU checks in one command, on a GPU machine with torch, torchvision and timm (and pytest) but
# none of our other dependencies and no network (this project's: one H100/H200, 16 cores,
# Python 3.12, torch 2.11). At most 8 minutes: each step has its own timeout, and they add up to 480 s.
#
#   bash benchmarks/gpu_check.sh                # there: install the carried wheels, run the GPU tests and
#                                               # the benchmarks, print one summary
#   bash benchmarks/gpu_check.sh --rehearse     # the same run where there may be no CUDA: each step that
#                                               # needs it reports "skipped: no CUDA" (make gpu-rehearsal)
#   bash benchmarks/gpu_check.sh --dry-run      # anywhere: print the plan; check what needs no GPU
#   bash benchmarks/gpu_check.sh --pack-sample  # here: copy part of the ImageNet sample into
#                                               # .gpu-data/ (the GPU machine gets the repository only)
#
# Wheels: `make gpu-wheels` downloads them into .whl/ (where there is network); without wheels the
# installed packages are used (WHEELS=DIR: another folder, e.g. an empty one for a venv they do not
# fit). Data: $USI_IMAGENET_SAMPLE, else ../shared/data/imagenet-sample, else .gpu-data/imagenet-sample.
# Logs and figures go to $OUT if set, else ./gpu-check/.
# Environment: PYTHON (default .venv/bin/python where it exists, else python3); TIMEOUT_SCALE (default 1:
# the timeouts are the GPU machine's; make gpu-rehearsal multiplies them for this project's 2 shared cores).
set -uo pipefail

cd "$(dirname "$0")/.."
REPO=$PWD
# the venv's where there is one (a developer's checkout), else the machine's (the GPU machines: python3)
if [ -z "${PYTHON:-}" ]; then [ -x .venv/bin/python ] && PYTHON=.venv/bin/python || PYTHON=python3; fi
OUT_DIR=${OUT:-$REPO/gpu-check}
PACK_DIR=.gpu-data/imagenet-sample
PACK_IMAGES=300  # about 33 MB of the 111 MB sample: with the wheels, inside a 64 MiB copy of the repo
WHEELS=${WHEELS:-.whl}
GPU_TESTS=(tests/test_*gpu*.py)  # as the Makefile's test-gpu (used where make is absent)
CUDA_STEPS=" train_step_profile train_step dataloader_gpu "  # measure CUDA alone: skipped in a rehearsal without it
TRAIN_BATCHES=9  # dataloader.py's training steps per epoch at batch 256: 1 + warm-up 2 + timed 6

mode=run
case "${1:-}" in
  --dry-run) mode=dry ;;
  --pack-sample) mode=pack ;;
  --rehearse) mode=rehearse ;;
  "") ;;
  -h | --help) sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
  *) echo "error: unknown argument '$1' (use --rehearse, --dry-run, --pack-sample or nothing)" >&2; exit 2 ;;
esac

if [ "$mode" = pack ]; then
  src=${USI_IMAGENET_SAMPLE:-../shared/data/imagenet-sample}/train
  [ -d "$src" ] || { echo "error: no sample at $src" >&2; exit 2; }
  mkdir -p "$PACK_DIR/train"
  # the first PACK_IMAGES class folders (one image each); what is there already is kept
  find "$src" -mindepth 1 -maxdepth 1 -type d | sort | head -n "$PACK_IMAGES" | while read -r d; do
    cp -Rn "$d" "$PACK_DIR/train/"
  done
  echo "$PACK_DIR: $(find "$PACK_DIR/train" -type f | wc -l) images, $(du -sh "$PACK_DIR" | cut -f1)"
  echo "copy .gpu-data/ (and .whl/) with the repository to the GPU machine: both are git-ignored"
  exit 0
fi

# ---------------------------------------------------------------- the data
sample=${USI_IMAGENET_SAMPLE:-}
if [ -z "$sample" ]; then
  for candidate in ../shared/data/imagenet-sample "$PACK_DIR"; do
    if [ -d "$candidate/train" ]; then sample=$candidate; break; fi
  done
fi
images=0
if [ -n "$sample" ] && [ -d "$sample/train" ]; then
  sample=$(cd "$sample" && pwd)
  images=$(find "$sample/train" -type f | wc -l)
fi
repeat=$(((TRAIN_BATCHES * 256 + images - 1) / (images > 0 ? images : 1)))  # an epoch of >= TRAIN_BATCHES batches

# ---------------------------------------------------------------- the plan
# name | timeout (s) | command | what it measures, at which sizes
SITE=$REPO/.site
NAMES=(setup tests train_step_profile train_step dataloader_gpu)
TIMEOUTS=(35 185 50 135 75)
if command -v make >/dev/null 2>&1; then
  tests_cmd="make test-gpu TEST_PYTHON=$PYTHON"
else
  tests_cmd="$PYTHON -m pytest -m gpu -rA ${GPU_TESTS[*]}"
fi
COMMANDS=(
  "install_and_import"
  "$tests_cmd"
  "$PYTHON benchmarks/train_step.py --profile --batch-size 32 --steps 3 --warmup 2 --set trainer.progress_bar=false"
  "$PYTHON benchmarks/train_step.py --runs 1 --steps 20 --warmup 8 --set trainer.progress_bar=false"
  "$PYTHON benchmarks/dataloader.py --pipeline gpu ${sample:+--src $sample }--repeat $repeat --workers 16 --batch-size 256 --runs 2 --steps 6 --warmup 2"
)
SIZES=(
  "wheels in $WHEELS/ -> $SITE (pip --no-index --no-deps), the project too; every import the checks need; sample images to MDS and back"
  "pytest -m gpu: FusedEMA kernels, inductor on CUDA, nvJPEG, the gpu pipeline, FSDP, 2 x 20 batches of train.py"
  "ops and host syncs per step, eager: resnet50 / tresnet_v2_l, 224 px, batch 32, 2 warm-up + 2 x 3 steps per loop, no progress bar"
  "ms per step, ours (compiled, bf16, no progress bar) vs timm vs plain: resnet50 / tresnet_v2_l, 224 px, batch 256, 8 warm-up + 20 timed steps, 1 run"
  "nvJPEG and the gpu pipeline: $images images x $repeat, 16 workers, batch 256, 2 passes; the step fed by MDS vs synthetic: 2 warm-up + 6 timed"
)

print_plan() {
  echo "gpu_check${REHEARSE:+ --rehearse}: repository $REPO, python $PYTHON, logs to $OUT_DIR"
  echo "sample: ${sample:-none found} ($images images)"
  local total=0 i
  for i in "${!NAMES[@]}"; do
    printf '  %-19s timeout %4ss  %s\n' "${NAMES[$i]}" "${TIMEOUTS[$i]}" "${COMMANDS[$i]}"
    printf '  %-19s                %s\n' "" "${SIZES[$i]}"
    total=$((total + TIMEOUTS[i]))
  done
  echo "  total of the timeouts: ${total}s${TIMEOUT_SCALE:+ (each x $TIMEOUT_SCALE here: TIMEOUT_SCALE)}"
}

if [ "$mode" = dry ]; then
  print_plan
  ok=1
  check() {  # check DESCRIPTION COMMAND...: run it, report, remember a failure
    if "${@:2}" >/tmp/gpu_check_dry.$$ 2>&1; then echo "ok: $1"; else echo "FAILED: $1"; tail -5 /tmp/gpu_check_dry.$$; ok=0; fi
  }
  check "bash -n $0" bash -n "$0"
  for f in benchmarks/train_step.py benchmarks/dataloader.py Makefile "${GPU_TESTS[@]}"; do
    check "$f exists" test -f "$f"
  done
  check "make test-gpu is a target" grep -q '^test-gpu:' Makefile
  check "the sample is there ($images images)" test "$images" -gt 0
  collected=$("$PYTHON" -m pytest --collect-only -q -m gpu -p no:cacheprovider "${GPU_TESTS[@]}" 2>&1 | tail -1)
  echo "collect: $collected"
  check "pytest -m gpu collects the GPU tests" grep -Eq '^[0-9]+/[0-9]+ tests collected' <<<"$collected"
  if [ -d "$WHEELS" ]; then echo "wheels: $(ls "$WHEELS"/*.whl 2>/dev/null | wc -l) in $WHEELS/"; else echo "wheels: no $WHEELS/ (the installed packages will be used)"; fi
  rm -f /tmp/gpu_check_dry.$$
  [ "$ok" = 1 ] && { echo "dry run: ok"; exit 0; }
  echo "dry run: FAILED" >&2
  exit 1
fi

# ---------------------------------------------------------------- the run
REHEARSE=$([ "$mode" = rehearse ] && echo 1)
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1 PIP_NO_INDEX=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=disabled
[ -n "$sample" ] && export USI_IMAGENET_SAMPLE=$sample

install_and_import() {
  if compgen -G "$WHEELS/*.whl" >/dev/null; then
    "$PYTHON" -m pip install -q --no-index --no-deps --upgrade --target "$SITE" "$WHEELS"/*.whl || return
    "$PYTHON" -m pip install -q --no-index --no-deps --no-build-isolation --ignore-requires-python --upgrade \
      --target "$SITE" . || return
  else
    echo "no wheels in $WHEELS/: using the installed packages"
  fi
  if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | sed 's/^/nvidia-smi: /'
  fi
  "$PYTHON" benchmarks/gpu_setup_check.py ${REHEARSE:+--allow-no-cuda}
}

if [ -d "$SITE" ] || compgen -G "$WHEELS/*.whl" >/dev/null; then export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}; fi
print_plan
STATUS=()
for i in "${!NAMES[@]}"; do
  name=${NAMES[$i]} limit=$((TIMEOUTS[i] * ${TIMEOUT_SCALE:-1})) log=$OUT_DIR/${NAMES[$i]}.log
  if [ "$i" -gt 0 ] && [[ ${STATUS[0]} != passed* ]]; then
    STATUS+=("skipped (setup failed)")
    echo "skipped: setup failed" >"$log"
    continue
  fi
  if [ "$i" -gt 0 ] && [[ $CUDA_STEPS == *" $name "* ]] && grep -q '^device: no CUDA device' "$OUT_DIR/setup.log"; then
    STATUS+=("skipped: no CUDA")  # only a rehearsal gets here: elsewhere setup fails without CUDA
    echo "skipped: no CUDA" | tee "$log"
    continue
  fi
  echo "=== $name (timeout ${limit}s): ${COMMANDS[$i]}"
  start=$SECONDS
  if [ "$name" = setup ]; then
    export -f install_and_import
    export SITE PYTHON REHEARSE WHEELS
  fi
  timeout --kill-after=10 "$limit" bash -c "${COMMANDS[$i]}" 2>&1 | tee "$log"
  rc=${PIPESTATUS[0]}
  seconds=$((SECONDS - start))
  case $rc in
    0) STATUS+=("passed in ${seconds}s") ;;
    124 | 137) STATUS+=("timed out after ${limit}s") ;;
    *) STATUS+=("failed (exit $rc) after ${seconds}s") ;;
  esac
done

# ---------------------------------------------------------------- the summary
export OUT_DIR
printf '%s\n' "${STATUS[@]}" >"$OUT_DIR/status.tmp"
"$PYTHON" - "${NAMES[@]}" <<'EOF' | tee "$OUT_DIR/summary.txt"
import json, os, re, sys
from pathlib import Path

out, names = Path(os.environ["OUT_DIR"]), sys.argv[1:]
status = dict(zip(names, (out / "status.tmp").read_text().splitlines()))
(out / "status.tmp").unlink()
text = {n: (out / f"{n}.log").read_text(errors="replace") if (out / f"{n}.log").exists() else "" for n in names}
device = next((m.group(1) for m in [re.search(r"^device: (.+)$", text["setup"], re.M)] if m), "unknown device")
report = {"device": device, "steps": status, "tests": {}, "figures": {}}
print(f"==== gpu_check summary on {device}")
for line in text["setup"].splitlines():
    if re.match(r"(python|version:|mds:|nvidia-smi:|warning:|rehearsal:) ", line):
        print(f"  {line}")
for name in names:
    print(f"{name}: {status[name]}")
outcomes = re.findall(r"^(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS) (.+)$", text["tests"], re.M)
for outcome, what in outcomes:
    report["tests"].setdefault(outcome.lower(), []).append(what)
    print(f"  {outcome} {what}")
final = re.findall(r"^=+ (.*(?:passed|failed|skipped|error).*) in [0-9.]+s", text["tests"], re.M)
if final:
    print(f"  tests: {final[-1]}")
SETTINGS = {"benchmark", "student", "teacher", "image_size", "batch_size", "num_classes", "steps", "warmup", "runs",
            "set", "profile", "device", "threads", "images", "workers", "pipeline", "gpu_decode"}
for name in names[2:]:
    lines = [line for line in text[name].splitlines() if line.startswith("{")]
    if status[name] == "skipped: no CUDA":
        continue
    if not lines:
        print(f"{name}: no figures")
        continue
    figures = json.loads(lines[-1])
    report["figures"][name] = figures
    sizes = ", ".join(f"{k}={figures[k]}" for k in figures if k in SETTINGS and k != "device")
    print(f"{name} on {figures.get('device', device)} ({sizes}):")
    for key, value in figures.items():
        if key not in SETTINGS:
            print(f"  {key}: {value}")
(out / "figures.json").write_text(json.dumps(report, indent=1) + "\n")
print(f"logs and figures.json in {out}")
EOF
for s in "${STATUS[@]}"; do
  case $s in passed* | "skipped: no CUDA") ;; *) exit 1 ;; esac
done
exit 0
