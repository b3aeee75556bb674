"""`kvserve bench serve`: an asyncio load generator for any OpenAI-compatible server (kvserve, `vllm serve`,
llama.cpp's `llama-server`), streaming every request and timing every chunk.

    kvserve bench serve --base-url http://127.0.0.1:8000 --workload sharegpt-like --request-rate 2 \\
        --num-requests 200 --seed 0 --slo-ttft-ms 2000 --slo-tpot-ms 200 --out run.json --plot run.png

Requests go to /v1/completions (prompt text: the messages' contents joined by blank lines) or /v1/chat/completions
(`--endpoint`; multi-turn always uses chat), with `stream: true` and `stream_options: {include_usage: true}`, so
token counts and `prompt_tokens_details.cached_tokens` come from the server where it reports them. With
`--ignore-eos` (the default) every request asks for `ignore_eos: true` so it generates exactly `max_tokens` tokens
on servers that honour it (kvserve, vLLM, llama.cpp); `--min-tokens` also sends `min_tokens = max_tokens`
(kvserve, vLLM).

Arrivals: `--request-rate R` draws gaps from a gamma distribution of mean 1/R and shape `--burstiness` (1 =
Poisson); `inf` (the default) sends everything at once. `--max-concurrency C` caps requests in flight. The `stall`
and `trace` workloads bring their own arrival times. A failed request (HTTP error, error event, cut stream, or
`--timeout`) is counted, never fatal. Metrics: kvserve/bench/metrics.py.

The JSON written by --out has `config` (everything needed to rerun it, the label included), `summary` (vLLM bench
serve's metric names) and `requests` (one record per request: send time, first-token time, every chunk's arrival
time, end time, prompt/output/cached tokens, error).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import math
import os
import platform
import random
import sys
import time

from kvserve.bench import metrics as M
from kvserve.bench import workloads as W

PROBE_PROMPT = "Say hello."


def log(msg: str) -> None:
    print(f"[bench serve] {msg}", file=sys.stderr, flush=True)


def arrival_offsets(n: int, rate: float, burstiness: float, rng: random.Random) -> list[float]:
    """Send times (seconds from the start) of n requests: gamma gaps of mean 1/rate and shape burstiness
    (burstiness 1 = a Poisson process); rate inf: all at 0. The first request goes at 0."""
    if n <= 0:
        return []
    if math.isinf(rate):
        return [0.0] * n
    if rate <= 0 or burstiness <= 0:
        raise ValueError("request rate and burstiness must be positive")
    theta = 1.0 / (rate * burstiness)
    out, t = [], 0.0
    for _ in range(n):
        out.append(t)
        t += rng.gammavariate(burstiness, theta)
    return out


class Client:
    """One streaming request at a time per call; httpx.AsyncClient with no connection cap."""

    def __init__(self, base_url: str, api_key: str | None, timeout: float, transport=None):
        import httpx

        # several comma-separated URLs: instances behind a client-side round robin (see Runner.one)
        self.base_urls = [u.strip().rstrip("/") for u in base_url.split(",") if u.strip()]
        self.base_urls = [u[:-3] if u.endswith("/v1") else u for u in self.base_urls]
        self.base_url = self.base_urls[0]
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.timeout = timeout
        self.http = httpx.AsyncClient(timeout=httpx.Timeout(timeout, connect=30.0),
                                      limits=httpx.Limits(max_connections=None, max_keepalive_connections=1000),
                                      transport=transport)

    async def close(self) -> None:
        await self.http.aclose()

    async def models(self) -> list[dict]:
        r = await self.http.get(f"{self.base_url}/v1/models", headers=self.headers)
        r.raise_for_status()
        return r.json().get("data", [])

    async def stream(self, endpoint: str, body: dict, rec: M.RequestRecord, t0: float, target: int = 0) -> None:
        """POST with stream: true to base URL number `target` (modulo their count) and fill rec (times relative to
        t0) from the server-sent events."""
        base_url = self.base_urls[target % len(self.base_urls)]
        path = "/v1/chat/completions" if endpoint == "chat" else "/v1/completions"
        now = time.perf_counter
        pieces: list[str] = []
        usage = None
        finished = False
        rec.send_time = now() - t0
        try:
            async with self.http.stream("POST", base_url + path, json=body, headers=self.headers) as resp:
                if resp.status_code != 200:
                    text = (await resp.aread()).decode("utf-8", "replace")
                    rec.error = f"HTTP {resp.status_code}: {text[:300]}"
                    return
                async for line in resp.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        finished = True
                        break
                    t = now() - t0
                    try:
                        chunk = json.loads(data)
                    except json.JSONDecodeError:
                        rec.error = f"bad event: {data[:200]}"
                        break
                    if chunk.get("error"):
                        err = chunk["error"]
                        rec.error = f"error event: {err.get('message', err) if isinstance(err, dict) else err}"
                        break
                    if chunk.get("usage"):
                        usage = chunk["usage"]
                    for choice in chunk.get("choices") or []:
                        if endpoint == "chat":
                            text = (choice.get("delta") or {}).get("content")
                        else:
                            text = choice.get("text")
                        if text:
                            if rec.first_token_time is None:
                                rec.first_token_time = t
                            rec.token_times.append(t)
                            pieces.append(text)
                        if choice.get("finish_reason"):
                            finished = True
        except Exception as e:  # connection refused / reset, read timeout ...
            rec.error = f"{type(e).__name__}: {e}"[:300]
        finally:
            rec.end_time = now() - t0
            rec.output_text = "".join(pieces)
        if rec.error is None and not finished:
            rec.error = "stream ended without finish_reason or [DONE]"
        if usage:
            rec.prompt_tokens = int(usage.get("prompt_tokens") or rec.prompt_tokens)
            if usage.get("completion_tokens") is not None:
                rec.output_tokens = int(usage["completion_tokens"])
            details = usage.get("prompt_tokens_details") or {}
            if details.get("cached_tokens") is not None:
                rec.cached_tokens = int(details["cached_tokens"])
        if not usage or usage.get("completion_tokens") is None:
            rec.output_tokens = len(rec.token_times)
        rec.success = rec.error is None and rec.first_token_time is not None
        if rec.error is None and rec.first_token_time is None:
            rec.error = "no token received"


def make_body(args, messages: list[dict], max_tokens: int, endpoint: str, segments: list[str] | None = None) -> dict:
    """The JSON body of one streaming request (only fields every server accepts, plus the asked-for extras)."""
    body: dict = {"model": args.model, "max_tokens": max_tokens, "temperature": args.temperature, "stream": True,
                  "stream_options": {"include_usage": True}}
    if endpoint == "chat":
        body["messages"] = messages
    elif segments and getattr(args, "prompt_segments", False):
        body["prompt_segments"] = segments  # the same text, as segments whose KV kvserve reuses (CacheBlend)
    else:
        body["prompt"] = "\n\n".join(m["content"] for m in messages)
    if args.ignore_eos:
        body["ignore_eos"] = True
    if args.min_tokens:
        body["min_tokens"] = max_tokens
    if args.top_p is not None:
        body["top_p"] = args.top_p
    body.update(args.extra_body)
    return body


class Runner:
    def __init__(self, args, requests: list[W.BenchRequest], tokenizer, client: Client):
        self.args = args
        self.requests = requests
        self.tok = tokenizer
        self.client = client
        self.sem = asyncio.Semaphore(args.max_concurrency) if args.max_concurrency else None
        self.records: list[M.RequestRecord] = []
        self.bar = None
        self.t0 = 0.0
        self._sent = 0

    def prompt_tokens(self, messages: list[dict], endpoint: str) -> int:
        """The client's own count, used when the server reports no usage."""
        try:
            if endpoint == "chat" and self.tok.has_chat_template:
                return len(self.tok.apply_chat_template(messages))
            return len(self.tok.encode("\n\n".join(m["content"] for m in messages)))
        except Exception:
            return 0

    async def one(self, req: W.BenchRequest, messages: list[dict], endpoint: str) -> M.RequestRecord:
        rec = M.RequestRecord(req.request_id, send_time=0.0, max_tokens=req.max_tokens, group=req.group,
                              conversation=req.conversation, turn=req.turn)
        body = make_body(self.args, messages, req.max_tokens, endpoint, req.segments)
        if getattr(self.args, "session_pin_seconds", 0) and req.conversation is not None:
            body["session_id"] = f"bench-{self.args.seed}-conv-{req.conversation}"
            body["kv_pin_seconds"] = self.args.session_pin_seconds
        # several base URLs: a conversation's turns alternate between them (turn k -> URL k mod n, the worst case
        # for per-instance prefix caches), other requests go round robin
        target = req.turn if req.turn is not None else self._sent
        self._sent += 1
        if self.sem is not None:
            async with self.sem:
                await self._send(endpoint, body, rec, target)
        else:
            await self._send(endpoint, body, rec, target)
        if not rec.prompt_tokens:  # the server reported no usage: count on the client, after the timing
            rec.prompt_tokens = self.prompt_tokens(messages, endpoint)
        self.records.append(rec)
        if self.bar is not None:
            self.bar.update(1)
        return rec

    async def _send(self, endpoint: str, body: dict, rec: M.RequestRecord, target: int = 0) -> None:
        try:
            await asyncio.wait_for(self.client.stream(endpoint, body, rec, self.t0, target), self.args.timeout)
        except asyncio.TimeoutError:
            rec.error = f"timeout: no end after {self.args.timeout} s"
            rec.end_time = time.perf_counter() - self.t0
            rec.success = False

    async def _at(self, offset: float) -> None:
        delay = self.t0 + offset - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)

    async def single(self, req: W.BenchRequest, offset: float, endpoint: str) -> None:
        await self._at(offset)
        await self.one(req, req.messages, endpoint)

    async def conversation(self, turns: list[W.BenchRequest], offset: float) -> None:
        await self._at(offset)
        history: list[dict] = []
        for i, req in enumerate(turns):
            if i and req.think_time > 0:
                await asyncio.sleep(req.think_time)
            messages = history + req.messages
            rec = await self.one(req, messages, "chat")
            if not rec.success:  # the rest of the conversation cannot be sent: count it as failed
                for later in turns[i + 1:]:
                    self.records.append(M.RequestRecord(later.request_id, send_time=rec.end_time or 0.0,
                                                        end_time=rec.end_time, max_tokens=later.max_tokens,
                                                        conversation=later.conversation, turn=later.turn,
                                                        error="skipped: an earlier turn failed"))
                    if self.bar is not None:
                        self.bar.update(1)
                return
            history = messages + [{"role": "assistant", "content": rec.output_text}]

    async def run(self) -> tuple[list[M.RequestRecord], float]:
        a = self.args
        rng = random.Random(a.seed + 1_000_003)  # arrivals: independent of the workload's own draws
        multi = any(r.conversation is not None for r in self.requests)
        fixed = all(r.arrival is not None for r in self.requests)
        tasks = []
        show = not a.no_progress and not os.environ.get("KVSERVE_NO_TQDM")
        if show:
            from tqdm import tqdm
            self.bar = tqdm(total=len(self.requests), desc=f"{a.workload} @ {a.label}", unit="req", file=sys.stderr)
        self.t0 = time.perf_counter()
        if multi:
            convs: dict[int, list[W.BenchRequest]] = {}
            for r in self.requests:
                convs.setdefault(r.conversation, []).append(r)
            offsets = arrival_offsets(len(convs), a.request_rate, a.burstiness, rng)
            for (cid, turns), off in zip(sorted(convs.items()), offsets):
                tasks.append(asyncio.create_task(self.conversation(sorted(turns, key=lambda r: r.turn), off)))
        else:
            offsets = ([r.arrival for r in self.requests] if fixed else
                       arrival_offsets(len(self.requests), a.request_rate, a.burstiness, rng))
            for r, off in zip(self.requests, offsets):
                tasks.append(asyncio.create_task(self.single(r, off, a.endpoint)))
        await asyncio.gather(*tasks)
        duration = time.perf_counter() - self.t0
        if self.bar is not None:
            self.bar.close()
        order = {r.request_id: i for i, r in enumerate(self.requests)}
        self.records.sort(key=lambda rec: order.get(rec.request_id, 0))
        return self.records, duration


async def _probe(client: Client, args) -> dict:
    """The served model id (when --model was not given) and one short request that must succeed."""
    info: dict = {}
    try:
        models = await client.models()
    except Exception as e:
        raise SystemExit(f"cannot list models at {client.base_url}/v1/models: {type(e).__name__}: {e}")
    if models:
        info["models"] = [{k: m.get(k) for k in ("id", "owned_by", "root", "max_model_len") if k in m}
                          for m in models]
    if not args.model:
        if not models:
            raise SystemExit("the server lists no model; pass --model")
        args.model = models[0]["id"]
    if not args.label:
        owner = (models[0].get("owned_by") if models else None) or ""
        args.label = owner if owner and owner not in ("organization-owner", "user", "system") else \
            client.base_url.split("//")[-1]
    if not args.no_test_request:
        endpoint = "chat" if args.workload == "multi-turn" else args.endpoint
        rec = M.RequestRecord("probe", 0.0)
        body = make_body(args, [{"role": "user", "content": PROBE_PROMPT}], 4, endpoint)
        await client.stream(endpoint, body, rec, time.perf_counter())
        if not rec.success:
            raise SystemExit(f"the test request failed: {rec.error}")
    return info


def build_parser(prog: str = "kvserve bench serve") -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=prog, description="Serving benchmark against an OpenAI-compatible server.",
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--base-url", required=True,
                    help="e.g. http://127.0.0.1:8000 (a trailing /v1 is fine); a comma-separated list sends requests "
                         "round robin and alternates each conversation's turns between the servers")
    ap.add_argument("--endpoint", choices=["completions", "chat"], default="completions",
                    help="/v1/completions or /v1/chat/completions (multi-turn always uses chat)")
    ap.add_argument("--model", default=None, help="model id to send; none: the first of /v1/models")
    ap.add_argument("--label", default=None, help="engine label in results and plots; none: the server's owned_by")
    ap.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY") or os.environ.get("KVSERVE_API_KEY"),
                    help="Bearer key (default $OPENAI_API_KEY or $KVSERVE_API_KEY)")
    ap.add_argument("--workload", choices=list(W.WORKLOADS), default="sharegpt-like")
    ap.add_argument("-W", "--workload-arg", action="append", default=[], metavar="KEY=VALUE",
                    help="workload parameter (see `kvserve bench workloads`), repeatable")
    ap.add_argument("--num-requests", type=int, default=None, help="requests (turns for multi-turn); none: the "
                                                                     "workload's default")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tokenizer", default=None, help="HF dir or GGUF that measures lengths; none: the embedded model")
    ap.add_argument("--request-rate", type=float, default=float("inf"), help="requests/s (inf: all at once)")
    ap.add_argument("--burstiness", type=float, default=1.0, help="gamma shape of arrival gaps (1: Poisson)")
    ap.add_argument("--max-concurrency", type=int, default=None, help="cap on requests in flight")
    ap.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True,
                    help="send ignore_eos so outputs are exactly max_tokens long")
    ap.add_argument("--min-tokens", action="store_true", help="also send min_tokens = max_tokens (kvserve, vLLM)")
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--top-p", type=float, default=None)
    ap.add_argument("--extra-body", default="{}", help="JSON object merged into every request body")
    ap.add_argument("--prompt-segments", action="store_true",
                    help="completions: send workloads' segmented prompts (rag) as prompt_segments (kvserve's "
                         "CacheBlend); the text is the same")
    ap.add_argument("--session-pin-seconds", type=float, default=0.0,
                    help="multi-turn: send session_id (one per conversation) and kv_pin_seconds, so kvserve keeps "
                         "each conversation's KV pinned between turns (0: off)")
    ap.add_argument("--slo-ttft-ms", type=float, default=None, help="goodput: TTFT SLO")
    ap.add_argument("--slo-tpot-ms", type=float, default=None, help="goodput: TPOT SLO")
    ap.add_argument("--slo-e2el-ms", type=float, default=None, help="goodput: end-to-end latency SLO")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds per request before it counts as failed")
    ap.add_argument("--out", default=None, help="write the results JSON here")
    ap.add_argument("--plot", default=None, help="write a PNG of the TTFT / ITL / E2EL CDFs and ITL over time")
    ap.add_argument("--save-text", action="store_true", help="keep each request's generated text in the JSON")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    ap.add_argument("--no-test-request", action="store_true", help="skip the short request sent before the run")
    return ap


def run(args) -> dict:
    if isinstance(args.extra_body, str):
        args.extra_body = json.loads(args.extra_body)
        if not isinstance(args.extra_body, dict):
            raise SystemExit("--extra-body must be a JSON object")
    try:
        params = W.parse_params(args.workload, args.workload_arg)
        tok = W.load_tokenizer(args.tokenizer)
        t = time.perf_counter()
        requests = W.generate(args.workload, tok, args.num_requests, args.seed, **params)
    except (ValueError, OSError) as e:
        raise SystemExit(f"kvserve bench serve: {e}") from None
    if args.workload in ("stall", "trace") and not math.isinf(args.request_rate):
        log(f"--request-rate is ignored: the {args.workload} workload has its own arrival times")
    log(f"{args.workload}: {len(requests)} requests, {sum(r.content_tokens for r in requests)} prompt tokens "
        f"(contents), {sum(r.max_tokens for r in requests)} max output tokens; generated in "
        f"{time.perf_counter() - t:.1f} s")
    endpoint = "chat" if args.workload == "multi-turn" else args.endpoint
    if endpoint != args.endpoint:
        log("multi-turn uses /v1/chat/completions")
        args.endpoint = endpoint

    async def main() -> tuple:
        client = Client(args.base_url, args.api_key, args.timeout)
        try:
            info = await _probe(client, args)
            records, duration = await Runner(args, requests, tok, client).run()
            return info, records, duration
        finally:
            await client.close()

    started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    info, records, duration = asyncio.run(main())
    summary = M.summarize(records, duration, args.slo_ttft_ms, args.slo_tpot_ms, args.slo_e2el_ms)
    short = [r for r in records if r.success and r.max_tokens is not None and r.output_tokens < r.max_tokens]
    summary["short_outputs"] = len(short)
    config = {"label": args.label, "base_url": args.base_url, "endpoint": args.endpoint, "model": args.model,
              "workload": args.workload, "workload_params": params, "num_requests": len(requests),
              "seed": args.seed, "request_rate": args.request_rate, "burstiness": args.burstiness,
              "max_concurrency": args.max_concurrency, "ignore_eos": args.ignore_eos, "min_tokens": args.min_tokens,
              "temperature": args.temperature, "top_p": args.top_p, "extra_body": args.extra_body,
              "session_pin_seconds": args.session_pin_seconds,
              "slo_ttft_ms": args.slo_ttft_ms, "slo_tpot_ms": args.slo_tpot_ms, "slo_e2el_ms": args.slo_e2el_ms,
              "timeout": args.timeout, "tokenizer": args.tokenizer or "embedded default model",
              "server": info, "date": started, "command": " ".join(["kvserve", "bench", "serve"] + args.argv),
              "client_host": {"cpus": os.cpu_count(), "python": platform.python_version(),
                              "platform": platform.platform()}}
    return {"kind": "kvserve-bench-serve", "version": 1, "config": config, "summary": summary,
            "requests": [r.to_dict(keep_text=args.save_text) for r in records]}


def json_safe(obj):
    """inf / nan -> strings, so the file is strict JSON."""
    if isinstance(obj, float) and (math.isinf(obj) or math.isnan(obj)):
        return str(obj)
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [json_safe(v) for v in obj]
    return obj


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    result = run(args)
    c = result["config"]
    pace = ("rate inf" if math.isinf(c["request_rate"]) else f"rate {c['request_rate']:g}/s") + (
        f", max concurrency {c['max_concurrency']}" if c["max_concurrency"] else "")
    print(M.report_text(result["summary"], f"{c['label']}: {c['workload']}, {pace}"))
    if result["summary"]["short_outputs"] and c["ignore_eos"]:
        log(f"{result['summary']['short_outputs']} requests stopped before max_tokens: the server may ignore "
            "ignore_eos")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(json_safe(result), f, indent=1)
        log(f"wrote {args.out}")
    if args.plot:
        from kvserve.bench.plots import plot_run
        plot_run(result, args.plot)
        log(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
