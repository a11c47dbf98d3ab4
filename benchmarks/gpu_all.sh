#!/usr/bin/env bash
# Every GPU check in one run on a bare CUDA machine: the pipeline through `dvc repro` on CUDA in
# its variants, then benchmarks/gpu_check.py. Results go to OUT/results.tar.gz, repacked after
# every step, so a run stopped by a time limit keeps what it finished; OUT/log.txt is the log.
#
#   bash benchmarks/gpu_all.sh OUT [STEP...]     # from the repo root; steps default to all, in order:
#       env default ddp compile stream free photos gpu_check
#
# Environment: WHEELS=DIR installs DVC, DVCLive and the rest of the lock that the machine lacks
# from wheels (pip --no-index --target); AIRBENCH=DIR is a clone of KellerJordan/cifar10-airbench
# for gpu_check's (viii); SMOKE=1 runs tiny sizes (the CPU path of the same script, for a check
# before a GPU is spent on it); DEADLINE=S (default 500) ends gpu_check, the last step, by S seconds
# after the start: its sections stop starting a minute before, and its JSON (OUT/gpu_check.json)
# is rewritten after each section. The pipeline runs in a fresh git + DVC copy of this tree.
set -uo pipefail
OUT=$(mkdir -p "${1:?usage: gpu_all.sh OUT [STEP...]}" && cd "$1" && pwd); shift
STEPS=${*:-env default ddp compile stream free photos gpu_check}
ROOT=$(pwd)
RES=$(mktemp -d /tmp/gpu_all.XXXX)  # everything kept, packed into OUT/results.tar.gz
PIPE=$(mktemp -d /tmp/gpu_pipe.XXXX)
SMOKE=${SMOKE:-}
export PYTHONUNBUFFERED=1 DVC_NO_ANALYTICS=1

say() { echo "[$(date +%T)] $*" | tee -a "$OUT/log.txt"; }
pack() { tar -czf "$OUT/results.tar.gz.tmp" -C "$RES" . && mv "$OUT/results.tar.gz.tmp" "$OUT/results.tar.gz"; }
# run NAME SECONDS CMD...: one step's command, its output in RES/NAME.log, its wall time and exit code in steps.tsv
run() {
    local name=$1 limit=$2; shift 2
    local t0=$SECONDS
    say "$name: $*"
    timeout --kill-after=10 "$limit" "$@" >"$RES/$name.log" 2>&1
    local rc=$?
    printf '%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - t0))" >>"$RES/steps.tsv"
    say "$name: exit $rc after $((SECONDS - t0)) s; last line: $(tail -n 1 "$RES/$name.log")"
    return $rc
}

if [ -n "${WHEELS:-}" ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        "$WHEELS"/*.whl || { say "wheels did not install"; exit 1; }
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} PATH=/tmp/site/bin:$PATH
fi
# dvc.yaml's commands call `python`; some images have only python3.
if ! command -v python >/dev/null; then
    mkdir -p /tmp/gpu_bin && ln -sf "$(command -v python3)" /tmp/gpu_bin/python && export PATH=/tmp/gpu_bin:$PATH
fi

# set_params KEY=VALUE...: as `dvc exp run -S` would write them (YAML 1.2, comments kept)
set_params() {
    python - "$@" <<'EOF'
import sys
from ruamel.yaml import YAML
yaml = YAML()
with open("params.yaml") as f:
    params = yaml.load(f)
for item in sys.argv[1:]:
    key, value = item.split("=", 1)
    section, name = key.split(".", 1)
    params[section][name] = yaml.load(value)
with open("params.yaml", "w") as f:
    yaml.dump(params, f)
EOF
}

# keep NAME: the files one pipeline run leaves that the figures come from
keep() {
    local dest=$RES/pipeline/$1
    mkdir -p "$dest"
    cp params.yaml "$dest/" 2>/dev/null
    cp metrics/train/run.json metrics/train/metrics.json "$dest/" 2>/dev/null
    cp metrics/evaluate/metrics.json "$dest/evaluate_metrics.json" 2>/dev/null
    if [ "${2:-}" = report ]; then cp -r report "$dest/" 2>/dev/null; fi
    python - "$1" "$dest" <<'EOF' | tee -a "$RES/pipeline/summary.tsv"
import json, sys
from pathlib import Path
name, dest = sys.argv[1], Path(sys.argv[2])
def read(f):
    try:
        return json.loads((dest / f).read_text())
    except (OSError, ValueError):
        return {}
run, train, ev = read("run.json"), read("metrics.json"), read("evaluate_metrics.json")
print("\t".join(str(x) for x in (name, ev.get("test", {}).get("accuracy"), train.get("samples_per_second"),
                                  run.get("device_names"), run.get("strategy"), run.get("precision"),
                                  "streamed" if run.get("data_streamed") else "resident" if run.get("data_on_device")
                                  else "host", run.get("compile"), run.get("epoch_seconds"))))
EOF
}

pipeline_copy() {
    [ -f "$PIPE/dvc.yaml" ] && return 0
    (cd "$ROOT" && tar --exclude=./.git --exclude=./.whl --exclude=./.peer --exclude=./.gpu -cf - .) | tar -xf - -C "$PIPE"
    cd "$PIPE" || return 1
    cp params.yaml "$RES/params.default.yaml"
    if command -v git >/dev/null; then
        git init -q && git config user.email gpu@example.com && git config user.name gpu-check
        git add -A && git commit -qm "the tree under test"
    else
        dvc config core.no_scm true  # no git on the machine: DVC alone still runs the pipeline
    fi
    cd "$ROOT" || return 1
}

for step in $STEPS; do
    case $step in
    env)
        {
            date -u; nvidia-smi || true; python3 --version; command -v git dvc python
            python3 -c "import torch, torchvision; print(torch.__version__, torchvision.__version__, torch.version.cuda,
torch.cuda.is_available() and torch.cuda.get_device_name(0))"
            dvc version 2>&1 | head -3
        } >"$RES/env.txt" 2>&1
        cat "$RES/env.txt" >>"$OUT/log.txt"
        ;;
    default)
        pipeline_copy && cd "$PIPE" || exit 1
        [ -n "$SMOKE" ] && set_params train.epochs=2
        run default 300 dvc repro && keep default report
        cd "$ROOT" || exit 1
        ;;
    ddp | compile | stream | free)
        pipeline_copy && cd "$PIPE" || exit 1
        # Each variant starts from the default params and changes one thing.
        cp "$RES/params.default.yaml" params.yaml
        [ -n "$SMOKE" ] && set_params train.epochs=2
        case $step in
        ddp) set_params train.strategy=ddp ;;  # one rank on the one GPU, NCCL, under the elastic launcher
        compile) set_params train.compile=reduce-overhead ;;
        stream) set_params train.data_placement=stream ;;
        free) set_params train.devices=free ;;
        esac
        run "$step" 240 dvc repro evaluate && keep "$step"
        cd "$ROOT" || exit 1
        ;;
    photos)
        pipeline_copy && cd "$PIPE" || exit 1
        cp "$RES/params.default.yaml" params.yaml
        count=20000 epochs=3
        [ -n "$SMOKE" ] && count=600 epochs=1
        run photos_make 120 python benchmarks/photos.py data/raw/photos "$count" --size 128 128 &&
            set_params data.dataset=imagefolder data.root=data/raw/photos data.image_size=128 model.name=resnet18 \
                train.batch_size=256 train.epochs=$epochs &&
            run photos 300 dvc repro evaluate && keep photos
        cd "$ROOT" || exit 1
        ;;
    gpu_check)
        left=$(( ${DEADLINE:-500} - SECONDS )); [ "$left" -lt 90 ] && left=90
        args=(--json "$OUT/gpu_check.json" --budget $((left - 60)) --seconds "${GPU_CHECK_SECONDS:-1.0}"
              --airbench-timeout $((left - 20)))
        [ -n "${AIRBENCH:-}" ] && args+=(--airbench "$AIRBENCH")
        [ -n "$SMOKE" ] && args+=(--smoke)
        run gpu_check "$left" python benchmarks/gpu_check.py "${args[@]}"
        cp "$OUT/gpu_check.json" "$RES/" 2>/dev/null
        ;;
    *) say "unknown step $step (allowed: env default ddp compile stream free photos gpu_check)"; exit 2 ;;
    esac
    pack
done
pack
say "done: $(wc -l <"$RES/steps.tsv" 2>/dev/null || echo 0) steps; results in $OUT/results.tar.gz"
