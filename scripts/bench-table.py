#!/usr/bin/env python3
"""Markdown tables of docs/benchmarks.md from one `glimpse profile --json` report (stdin or a path).

Usage: python3 scripts/bench-table.py docs/bench/smolvlm-500m.json
"""
import json
import sys

d = json.load(open(sys.argv[1]) if len(sys.argv) > 1 else sys.stdin)
rows = d["rows"]
med = lambda r, k: r["stages"][k]["median_ms"]  # noqa: E731
if len({r.get("dtype") for r in rows}) > 1:
    # a --dtypes sweep: one row per backend and dtype, ratios against fp32 of the same backend
    print("| backend | dtype | visual tokens | prompt tokens | encode | prefill | TTFT | decode tok/s | prefill vs fp32 "
          "| encode vs fp32 | decode vs fp32 |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    fp32 = {r["backend"]: r for r in rows if r.get("dtype") == "fp32"}
    for r in rows:
        f = fp32.get(r["backend"])
        ratio = lambda k: f"{med(f, k) / med(r, k):.2f}x" if f else "-"  # noqa: E731
        dec = f"{r['decode_tokens_per_s'] / f['decode_tokens_per_s']:.2f}x" if f else "-"
        print(f"| {r['backend']} | {r['dtype']} | {r['visual_tokens_kept']}/{r['visual_tokens']} | {r['prompt_tokens']} "
              f"| {med(r, 'encode'):.0f} | {med(r, 'prefill'):.0f} | {med(r, 'ttft'):.0f} "
              f"| {r['decode_tokens_per_s']:.2f} | {ratio('prefill')} | {ratio('encode')} | {dec} |")
    print("\n(ratios > 1: faster than fp32 with the same backend)")
    sys.exit(0)
print("| backend | keep | visual tokens | prompt tokens | preprocess | encode (per view) | select | splice | prefill | TTFT "
      "| decode tok/s | end to end |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|")
for r in rows:
    print(f"| {r['backend']} | {r['keep']} | {r['visual_tokens_kept']}/{r['visual_tokens']} | {r['prompt_tokens']} "
          f"| {med(r, 'preprocess'):.0f} | {med(r, 'encode'):.0f} ({med(r, 'encode_per_view'):.0f}) | {med(r, 'select'):.1f} "
          f"| {med(r, 'splice'):.1f} | {med(r, 'prefill'):.0f} | {med(r, 'ttft'):.0f} | {r['decode_tokens_per_s']:.1f} "
          f"| {med(r, 'end_to_end'):.0f} |")
by = {(r["backend"], r["keep"]): r for r in rows}
backends = sorted({r["backend"] for r in rows}, key=lambda b: b != "tract")
keeps = [r["keep"] for r in rows if r["backend"] == backends[0]]
if "tract" in backends and "ort" in backends:
    print("\nGlimpse (tract) / ONNX Runtime time ratio per stage, same keep:\n")
    print("| keep | preprocess | encode | prefill | decode | TTFT |")
    print("|---|---|---|---|---|---|")
    for k in keeps:
        t, o = by[("tract", k)], by[("ort", k)]
        print(f"| {k} | " + " | ".join(f"{med(t, s) / med(o, s):.2f}" for s in ("preprocess", "encode", "prefill", "decode", "ttft"))
              + " |")
print("\nSpeed-up from pruning, within each backend, vs keep 1.0:\n")
print("| backend | keep | prefill | TTFT |")
print("|---|---|---|---|")
for b in backends:
    base = by[(b, keeps[0])]
    for k in keeps[1:]:
        r = by[(b, k)]
        print(f"| {b} | {k} | {med(base, 'prefill') / med(r, 'prefill'):.2f}x | {med(base, 'ttft') / med(r, 'ttft'):.2f}x |")
cal = {c["backend"]: c for c in d.get("calibration", [])}
if cal:
    print("\nEfficiency against the calibrated limits (keep 1.0):\n")
    print("| backend | GEMM peak GFLOP/s | encode GFLOP/s (eff.) | prefill GFLOP/s (eff.) | read bandwidth GB/s | decode GB/s (eff.) |")
    print("|---|---|---|---|---|---|")
    for b in backends:
        e, c = by[(b, keeps[0])]["efficiency"], cal.get(b)
        if c is None:
            continue
        pct = lambda x: f"{100 * x:.0f}%" if x is not None else "-"  # noqa: E731
        print(f"| {b} | {c['gemm_gflops']:.1f} | {e['encode_gflops']:.1f} ({pct(e['encode_efficiency'])}) "
              f"| {e['prefill_gflops']:.1f} ({pct(e['prefill_efficiency'])}) | {c['bandwidth_gb_s']:.1f} "
              f"| {e['decode_gb_s']:.1f} ({pct(e['decode_efficiency'])}) |")
gap = max(r["accounting_gap"] for r in rows)
print(f"\nModel {d['model_bytes'] / 1e6:.0f} MB on disk; peak RSS {d['peak_rss_bytes'] / 1e6:.0f} MB; "
      f"stage times tile end to end (accounting gap {100 * gap:.2f}% at most).")
