#!/usr/bin/env bash
# Throughput of several source trees on one GPU machine, in alternating rounds, each run
# importing its own tree's installed copy of kvloom and nothing else. (Running an old
# tree's script beside an editable install of the new one measures the new code twice:
# the script puts only benchmarks/ on sys.path, and `import kvloom` finds the install.)
#
# Usage: bash benchmarks/ab_throughput.sh MODEL ROUNDS NAME=DIR [NAME=DIR ...]
#   e.g. git archive OLD | tar -x -C /tmp/old, then ... qwen2-0.5b 3 old=/tmp/old new=.
# The first tree's first run also runs the HF transformers peer (its figure, same run).
# Packages the GPU machine lacks (pydantic, ...) are taken from .whl/ if it is there.
# Results and logs go to $OUT (or ./gpu-out); a table of every run is printed last.
set -u
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"; OUT=$(cd "$OUT" && pwd)
model=$1 rounds=$2; shift 2
runs=$OUT/runs; mkdir -p "$runs"  # one JSON per run; every run's log goes to runs.log
extra=""
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/ab-site .whl/*.whl \
        || exit 1
    extra=/tmp/ab-site
fi
for spec in "$@"; do
    name=${spec%%=*} dir=${spec#*=}
    python3 -m pip install -q --no-deps --no-build-isolation --no-compile \
        --target "/tmp/ab/$name" "$dir" > /tmp/ab-install.log 2>&1 \
        || { echo "installing $name failed"; tail -n 20 /tmp/ab-install.log; exit 1; }
done
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device.txt"

budget_end=$(( $(date +%s) + ${BUDGET_S:-480} ))
first=1
for round in $(seq "$rounds"); do
    for spec in "$@"; do
        name=${spec%%=*} dir=${spec#*=}
        script=$(cd "$dir" && pwd)/benchmarks/throughput.py
        if [ "$(date +%s)" -ge "$budget_end" ]; then
            echo "=== out of time before round $round $name"; break 2
        fi
        hf=--skip-hf; limit=200
        if [ $first = 1 ]; then hf=""; limit=400; first=0; fi
        log=/tmp/ab-run.log
        # From /tmp, so no kvloom/ directory of a checkout can shadow the install.
        (cd /tmp && PYTHONPATH="/tmp/ab/$name${extra:+:$extra}" python3 -c \
            "import kvloom; print('kvloom from', kvloom.__file__)" && \
         PYTHONPATH="/tmp/ab/$name${extra:+:$extra}" timeout $limit python3 "$script" \
            --model "$model" $hf --json "$runs/throughput_${name}_$round.json") \
            > "$log" 2>&1
        status=$?
        { echo "=== round $round $name exit $status"; cat "$log"; } >> "$OUT/runs.log"
        echo "=== round $round $name exit $status: $(grep -m1 'kvloom from' "$log")"
        tail -n 4 "$log"
    done
done

python3 - "$runs" <<'EOF'
import json, pathlib, statistics, sys
runs = {}
for path in sorted(pathlib.Path(sys.argv[1]).glob("throughput_*_*.json")):
    name, round_ = path.stem.split("_", 1)[1].rsplit("_", 1)
    results = {r["engine"]: r["tok_per_s"] for r in json.loads(path.read_text())["results"]}
    runs.setdefault(name, []).append((int(round_), results))
print(f"{'tree':<12}{'kvloom out tok/s, by round':<40}{'median':>10}  peer (same call)")
for name, rows in runs.items():
    rows.sort(key=lambda row: row[0])
    kvloom = [results[next(iter(results))] for _, results in rows]
    peers = [f"{engine} {tps:,.0f}" for _, results in rows for engine, tps in
             list(results.items())[1:]]
    print(f"{name:<12}{' / '.join(f'{t:,.0f}' for t in kvloom):<40}"
          f"{statistics.median(kvloom):>10,.0f}  {', '.join(peers)}")
EOF
