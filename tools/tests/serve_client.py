"""Drives a running `glimpse serve` with the official OpenAI client (and raw HTTP for bad input).

Run by tools/tests/serve.rs, which starts the server and checks the JSON report this prints:

  python serve_client.py check --base URL --image PNG --prompt TEXT --max-tokens N --allowed-image PNG
  python serve_client.py load  --base URL --image PNG --prompt TEXT --clients 8 --requests 25 --pid PID
  python serve_client.py soak  --base URL --image PNG --prompt TEXT --requests 1000 --pid PID

`check`: one answer (non-streamed and streamed), concurrent clients, a full queue (429 with
Retry-After, while a long request holds the worker and two wait), a disconnected client
cancelling its request, and bad input (malformed JSON, huge body, bad base64, non-image data,
disallowed paths, remote URLs, a prompt past the context). `load`: N clients x M requests,
statuses, p50/p99 latency, throughput, server RSS before and after. `soak`: requests in turn, the
server's RSS sampled after each.
"""

import argparse
import base64
import concurrent.futures
import http.client
import json
import os
import sys
import time
import urllib.parse

import openai


def data_url(path):
    with open(path, "rb") as f:
        return "data:image/png;base64," + base64.b64encode(f.read()).decode()


def messages(prompt, image_url):
    return [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": image_url}},
        {"type": "text", "text": prompt},
    ]}]


def client(base, retries=0):
    return openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=retries, timeout=120)


def raw(base, method, path, body=None, headers=None):
    """(status, headers, body bytes) of one plain HTTP request."""
    u = urllib.parse.urlparse(base)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=120)
    try:
        conn.request(method, path, body=body, headers=headers or {})
    except (BrokenPipeError, ConnectionResetError):
        pass  # the server answered (413) and closed before the whole body was sent: read its answer
    r = conn.getresponse()
    out = (r.status, dict(r.getheaders()), r.read())
    conn.close()
    return out


def post_json(base, obj):
    body = obj if isinstance(obj, (bytes, bytearray)) else json.dumps(obj).encode()
    status, _, data = raw(base, "POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
    try:
        err = json.loads(data).get("error", {})
    except ValueError:
        err = {"unparsed": data[:200].decode(errors="replace")}
    return {"status": status, "error": err}


def metric(base, name):
    _, _, body = raw(base, "GET", "/metrics")
    total = 0.0
    for line in body.decode().splitlines():
        if line.startswith(name) and not line.startswith("#"):
            rest = line[len(name):]
            if rest[:1] in (" ", "{"):
                total += float(line.rsplit(" ", 1)[1])
    return total


def check(a):
    c = client(a.base)
    url = data_url(a.image)
    msgs = messages(a.prompt, url)
    report = {}
    r = c.chat.completions.create(model="any", messages=msgs, max_tokens=a.max_tokens, temperature=0, seed=0)
    report["answer"] = r.choices[0].message.content
    report["finish_reason"] = r.choices[0].finish_reason
    report["usage"] = {"prompt": r.usage.prompt_tokens, "completion": r.usage.completion_tokens}
    report["glimpse"] = (r.model_extra or {}).get("glimpse")
    pieces, finishes, usage = [], [], None
    stream = c.chat.completions.create(model="any", messages=msgs, max_tokens=a.max_tokens, temperature=0, seed=0,
                                       stream=True, stream_options={"include_usage": True})
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage.completion_tokens
        for ch in chunk.choices:
            if ch.delta.content:
                pieces.append(ch.delta.content)
            if ch.finish_reason:
                finishes.append(ch.finish_reason)
    report["streamed"] = "".join(pieces)
    report["stream_pieces"] = len(pieces)
    report["stream_finish"] = finishes
    report["stream_usage_completion"] = usage
    # a local path under --allow-dir answers the same
    r = c.chat.completions.create(model="any", messages=messages(a.prompt, a.allowed_image), max_tokens=a.max_tokens,
                                  temperature=0, seed=0)
    report["by_path"] = r.choices[0].message.content
    # a stop sequence cuts the answer before it
    if len(report["answer"]) > 1:
        stop = report["answer"][1:2]
        r = c.chat.completions.create(model="any", messages=msgs, max_tokens=a.max_tokens, temperature=0, seed=0,
                                      stop=[stop])
        report["stop"] = {"sequence": stop, "answer": r.choices[0].message.content,
                          "finish_reason": r.choices[0].finish_reason}
    # a per-request selection: fewer visual tokens reach the model
    r = c.chat.completions.create(model="any", messages=msgs, max_tokens=a.max_tokens, temperature=0, seed=0,
                                  extra_body={"glimpse": {"prune": "random", "keep": 0.25}})
    report["pruned_glimpse"] = (r.model_extra or {}).get("glimpse")
    # encoder-side reduction per request needs the staged encoder loaded (this server has not)
    report["regions_unstaged"] = post_json(a.base, {"model": "m", "messages": msgs, "max_tokens": 2,
                                                    "glimpse": {"regions": 0.5}})

    # concurrent clients, each with its own connection
    def one(_):
        cc = client(a.base, retries=3)
        return cc.chat.completions.create(model="any", messages=msgs, max_tokens=a.max_tokens, temperature=0,
                                          seed=0).choices[0].message.content
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        report["concurrent"] = list(pool.map(one, range(4)))

    # a full queue: a long request holds the worker, two wait (--queue 2), the next is refused
    cancelled_before = metric(a.base, "glimpse_requests_cancelled_total")
    long = client(a.base).chat.completions.create(
        model="any", messages=msgs, max_tokens=100000, temperature=0, stream=True,
        extra_body={"glimpse": {"ignore_eos": True}})
    next(iter(long))  # the first chunk: it is running
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        waiting = [pool.submit(one, i) for i in range(2)]
        deadline = time.time() + 30
        while metric(a.base, "glimpse_queue_depth") < 2 and time.time() < deadline:
            time.sleep(0.02)
        report["queue_depth_seen"] = metric(a.base, "glimpse_queue_depth")
        try:
            client(a.base).chat.completions.create(model="any", messages=msgs, max_tokens=4, temperature=0)
            report["full_queue"] = {"status": 200}
        except openai.RateLimitError as e:
            report["full_queue"] = {"status": e.status_code, "retry_after": e.response.headers.get("retry-after"),
                                    "message": e.message}
        long.close()  # the client goes away: its request is cancelled, the waiting ones run
        report["after_cancel"] = [w.result() for w in waiting]
    report["cancelled"] = metric(a.base, "glimpse_requests_cancelled_total") - cancelled_before

    # bad input: clear 4xx errors, never 5xx
    png_text = base64.b64encode(b"this is not an image").decode()
    bad = {
        "malformed_json": b'{"model": "m", "messages": [',
        "huge_body": b'{"model": "m", "pad": "' + b"x" * (a.body_limit_mib * 1048576 + 1) + b'"}',
        "bad_base64": {"model": "m", "messages": messages("q", "data:image/png;base64,@@not-base64@@")},
        "not_an_image": {"model": "m", "messages": messages("q", "data:image/png;base64," + png_text)},
        "disallowed_path": {"model": "m", "messages": messages("q", "/etc/hostname")},
        "escaping_path": {"model": "m", "messages": messages("q", os.path.dirname(a.allowed_image) + "/../../../../../../etc/hostname")},
        "remote_url": {"model": "m", "messages": messages("q", "https://example.com/a.png")},
        "no_messages": {"model": "m", "messages": []},
        "unsupported_field": {"model": "m", "messages": [{"role": "user", "content": "q"}], "tools": []},
        "past_context": {"model": "m", "messages": [{"role": "user", "content": "word " * 40000}]},
        "bad_glimpse": {"model": "m", "messages": [{"role": "user", "content": "q"}], "glimpse": {"prune": "nope"}},
    }
    report["bad"] = {name: post_json(a.base, body) for name, body in bad.items()}
    status, _, _ = raw(a.base, "GET", "/nowhere")
    report["bad"]["unknown_route"] = {"status": status}
    report["models"] = [m.id for m in c.models.list().data]
    report["health"] = json.loads(raw(a.base, "GET", "/health")[2])
    _, headers, body = raw(a.base, "GET", "/metrics")
    report["metrics"] = body.decode()
    print(json.dumps(report))


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return None


def load(a):
    msgs = messages(a.prompt, data_url(a.image))
    rss_before = rss_kib(a.pid)
    # with the staged encoder loaded (--request-reduction), a request's own region skipping encodes fewer tokens
    regions = None
    if a.regions_check:
        r = client(a.base).chat.completions.create(model="any", messages=msgs, max_tokens=a.max_tokens, temperature=0,
                                                   extra_body={"glimpse": {"regions": 0.5}})
        full = client(a.base).chat.completions.create(model="any", messages=msgs, max_tokens=a.max_tokens,
                                                      temperature=0)
        regions = {"regions": r.model_extra["glimpse"], "full": full.model_extra["glimpse"]}

    def run_client(i):
        c = client(a.base)
        out = []
        for _ in range(a.requests):
            t = time.perf_counter()
            try:
                c.chat.completions.create(model="any", messages=msgs, max_tokens=a.max_tokens, temperature=0)
                status = 200
            except openai.APIStatusError as e:
                status = e.status_code
            except openai.APIConnectionError:
                status = "connection"
            out.append((status, time.perf_counter() - t))
        return out

    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(a.clients) as pool:
        results = [r for rs in pool.map(run_client, range(a.clients)) for r in rs]
    wall = time.perf_counter() - started
    ok = sorted(t for s, t in results if s == 200)
    statuses = {}
    for s, _ in results:
        statuses[str(s)] = statuses.get(str(s), 0) + 1

    def pct(p):
        return ok[min(len(ok) - 1, int(round(p / 100 * (len(ok) - 1))))] * 1e3 if ok else None
    print(json.dumps({
        "clients": a.clients, "requests_per_client": a.requests, "sent": len(results), "statuses": statuses,
        "p50_ms": pct(50), "p99_ms": pct(99), "answered_per_s": len(ok) / wall, "wall_s": wall,
        "rss_kib_before": rss_before, "rss_kib_after": rss_kib(a.pid), "regions_check": regions,
    }))


def soak(a):
    """1000 requests in turn (image and text-only, streamed and whole, some with a selection) through one server,
    its RSS sampled after every request: the median over requests 101-200 against the median over the last 100."""
    c = client(a.base)
    img = messages(a.prompt, data_url(a.image))
    text = [{"role": "user", "content": "Is there a red square?"}]
    statuses, samples, base, curve = {}, [], None, []
    for i in range(a.requests):
        kind = i % 4
        try:
            if kind == 0:
                c.chat.completions.create(model="any", messages=img, max_tokens=4, temperature=0)
            elif kind == 1:
                for _ in c.chat.completions.create(model="any", messages=img, max_tokens=4, temperature=0, stream=True):
                    pass
            elif kind == 2:
                c.chat.completions.create(model="any", messages=text, max_tokens=4, temperature=0)
            else:
                c.chat.completions.create(model="any", messages=img, max_tokens=4, temperature=0,
                                          extra_body={"glimpse": {"prune": "divprune", "keep": 0.25}})
            status = 200
        except openai.APIStatusError as e:
            status = e.status_code
        statuses[str(status)] = statuses.get(str(status), 0) + 1
        rss = rss_kib(a.pid)
        if (i + 1) % 100 == 0:
            curve.append(rss)
        if i == 99:
            base = rss
        elif i > 99:
            samples.append(rss)
    # drift, not the transient of a request still being torn down when its answer arrived: the median of
    # requests 101-200 against the median of the last 100
    def median(v):
        v = sorted(v)
        return v[len(v) // 2] if v else None
    first, last = median(samples[:100]), median(samples[-100:])
    print(json.dumps({"requests": a.requests, "statuses": statuses, "rss_kib_after_100": base,
                      "rss_kib_median_101_200": first, "rss_kib_median_last_100": last,
                      "rss_kib_peak_after_100": max(samples) if samples else None,
                      "growth": (last - first) / first if first and last else None, "rss_kib_every_100": curve}))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["check", "load", "soak"])
    p.add_argument("--base", required=True)
    p.add_argument("--image", required=True)
    p.add_argument("--allowed-image")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--body-limit-mib", type=int, default=2)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--requests", type=int, default=25)
    p.add_argument("--pid", type=int)
    p.add_argument("--regions-check", action="store_true")
    a = p.parse_args()
    {"check": check, "load": load, "soak": soak}[a.mode](a)


if __name__ == "__main__":
    sys.exit(main())
