#!/usr/bin/env python3
"""Helper of scripts/bench-vs-llamacpp: records each engine's raw output as one JSON line, then
prints the side-by-side table (median over repetitions of prompt and decode tokens/s for
llama.cpp's llama-bench and moeshard, their ratio, and moeshard's bandwidth and bound).

Subcommands:
  record ENGINE MODEL THREADS REP OK FILE...  print one JSON line (FILEs: the engine's stdout if
                                              OK, llama-bench's being one JSON list each; else stderr)
  report RESULTS.jsonl [--n-prompt P] [--n-gen N] [--llama-bench PATH]
  dump RESULTS.jsonl                        all records as one JSON array
"""

import argparse
import json
import os
import statistics
import sys


def parse_llama_bench(tests):
    """llama-bench -o json prints a list with one object per test: pp (n_gen 0) and tg (n_prompt 0)."""
    out = {}
    for t in tests:
        if t.get("n_gen", 0) == 0 and t.get("n_prompt", 0) > 0:
            out["prompt_tps"] = float(t["avg_ts"])
        elif t.get("n_prompt", 0) == 0 and t.get("n_gen", 0) > 0:
            out["decode_tps"] = float(t["avg_ts"])
            out["decode_depth"] = int(t.get("n_depth", 0))
        for key in ("build_commit", "cpu_info", "backends", "model_type", "model_size", "n_threads"):
            if key in t:
                out.setdefault(key, t[key])
    return out


def cmd_record(args):
    texts = []
    for path in args.files:
        with open(path, encoding="utf-8", errors="replace") as f:
            texts.append(f.read())
    text = "\n".join(texts)
    rec = {"engine": args.engine, "model": args.model, "threads": int(args.threads), "rep": int(args.rep)}
    if args.ok == "1":
        try:
            if args.engine == "llama.cpp":
                rec["result"] = parse_llama_bench([t for x in texts for t in json.loads(x)])
            else:
                rec["result"] = json.loads(text)
            rec["ok"] = True
        except (ValueError, KeyError, TypeError) as e:
            rec["ok"] = False
            rec["error"] = f"unparseable output ({e}): {text[-400:]}"
    else:
        rec["ok"] = False
        rec["error"] = error_lines(text)
    print(json.dumps(rec))


def error_lines(text):
    """The lines of a failed llama-bench's stderr that say why, without its long model dump."""
    lines = [ln.rstrip() for ln in text.splitlines() if ln.strip()]
    keep = [ln for ln in lines if any(w in ln.lower() for w in ("error", "failed", "unknown", "invalid", "missing", "wrong"))]
    chosen = keep if keep else lines[-6:]
    return "\n".join(chosen[-8:])


def load(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(ln) for ln in f if ln.strip()]


def median(values):
    return statistics.median(values) if values else None


def fmt(x, spec=".1f"):
    return "-" if x is None else format(x, spec)


def ratio(a, b):
    return None if a is None or b is None or b == 0 else a / b


def cmd_report(args):
    recs = load(args.results)
    keys = []
    for r in recs:
        k = (r["model"], r["threads"])
        if k not in keys:
            keys.append(k)
    commit = next((r["result"].get("build_commit") for r in recs if r["engine"] == "llama.cpp" and r["ok"]), None)
    cpu = next((r["result"].get("cpu_info") for r in recs if r["engine"] == "llama.cpp" and r["ok"]), None)
    kernels = next((r["result"].get("kernels") for r in recs if r["engine"] == "moeshard" and r["ok"]), None)
    print(f"prompt {args.n_prompt} tokens, decode {args.n_gen} tokens; tok/s are medians over repetitions (min in brackets)")
    print(f"both engines decode at context {args.n_prompt}..{args.n_prompt + args.n_gen} "
          f"(llama-bench -d {args.n_prompt}); prompts start from an empty context")
    if commit or args.llama_bench:
        print(f"llama.cpp: {args.llama_bench or 'llama-bench'} (commit {commit or '?'}); cpu: {cpu or '?'}")
    if kernels:
        print(f"moeshard kernels: {kernels}")
    for model, threads in keys:
        rows = [r for r in recs if r["model"] == model and r["threads"] == threads]
        lc = [r for r in rows if r["engine"] == "llama.cpp"]
        ms = [r for r in rows if r["engine"] == "moeshard"]
        r8 = [r for r in rows if r["engine"] == "moeshard-r8"]
        lc_ok = [r["result"] for r in lc if r["ok"]]
        ms_ok = [r["result"] for r in ms if r["ok"]]
        r8_ok = [r["result"] for r in r8 if r["ok"]]
        engines = [("llama.cpp", lc_ok), ("moeshard", ms_ok)]
        if r8:
            # The same model converted by `moeshard convert --repack` (Q4_K_R8), same bytes.
            engines.append(("moeshard Q4_K_R8", r8_ok))
        print()
        print(f"## {os.path.basename(model)}, {threads} thread(s)  "
              f"(llama.cpp {len(lc_ok)}/{len(lc)} runs ok, moeshard {len(ms_ok)}/{len(ms)})")
        col = {}
        for name, res in engines:
            pp = [x["prompt_tps"] for x in res if "prompt_tps" in x]
            tg = [x["decode_tps"] for x in res if "decode_tps" in x]
            col[name] = (median(pp), min(pp) if pp else None, median(tg), min(tg) if tg else None)
        print(f"| {'engine':<18} | {'prompt tok/s':>20} | {'decode tok/s':>20} |")
        print(f"|{'-' * 20}|{'-' * 22}|{'-' * 22}|")
        for name, _ in engines:
            pmed, pmin, dmed, dmin = col[name]
            print(f"| {name:<18} | {fmt(pmed):>10} [{fmt(pmin):>7}] | {fmt(dmed):>10} [{fmt(dmin):>7}] |")
        for name, _ in engines[1:]:
            pr = ratio(col[name][0], col["llama.cpp"][0])
            dr = ratio(col[name][2], col["llama.cpp"][2])
            label = f"{name}/llama.cpp".replace("moeshard Q4_K_R8", "R8")
            print(f"| {label:<18} | {fmt(pr, '.2f') + ('x' if pr else ''):>20} | {fmt(dr, '.2f') + ('x' if dr else ''):>20} |")
        if ms_ok:
            bw = median([x["bandwidth_gbs"] for x in ms_ok if "bandwidth_gbs" in x])
            bound = median([x["bound_tps"] for x in ms_ok if "bound_tps" in x])
            bpt = median([x["bytes_per_token"] for x in ms_ok if "bytes_per_token" in x])
            rss = max((x["peak_rss_bytes"] for x in ms_ok if "peak_rss_bytes" in x), default=None)
            lc_frac = ratio(col["llama.cpp"][2], bound)
            ms_frac = ratio(col["moeshard"][2], bound)
            print(f"moeshard: bandwidth {fmt(bw)} GB/s, {fmt(bpt / 1e6 if bpt else None)} MB read per token, "
                  f"bound {fmt(bound)} tok/s; decode at {fmt(ms_frac * 100 if ms_frac else None, '.0f')}% "
                  f"of the bound (llama.cpp {fmt(lc_frac * 100 if lc_frac else None, '.0f')}%); "
                  f"peak RSS {fmt(rss / 2**20 if rss else None, '.0f')} MiB")
        if r8_ok:
            frac = ratio(col["moeshard Q4_K_R8"][2], bound if ms_ok else None)
            rss = max((x["peak_rss_bytes"] for x in r8_ok if "peak_rss_bytes" in x), default=None)
            print(f"moeshard Q4_K_R8: decode at {fmt(frac * 100 if frac else None, '.0f')}% of the bound; "
                  f"peak RSS {fmt(rss / 2**20 if rss else None, '.0f')} MiB")
        errors = sorted({r["error"] for r in lc + ms + r8 if not r["ok"]})
        for e in errors:
            print("llama.cpp could not run this file:" if any(r.get("error") == e for r in lc) else "error:")
            for ln in e.splitlines():
                print(f"    {ln}")


def cmd_dump(args):
    json.dump(load(args.results), sys.stdout, indent=1)
    print()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("record")
    for name in ("engine", "model", "threads", "rep", "ok"):
        r.add_argument(name)
    r.add_argument("files", nargs="+")
    p = sub.add_parser("report")
    p.add_argument("results")
    p.add_argument("--n-prompt", type=int, default=128)
    p.add_argument("--n-gen", type=int, default=64)
    p.add_argument("--llama-bench", default="")
    d = sub.add_parser("dump")
    d.add_argument("results")
    args = ap.parse_args()
    {"record": cmd_record, "report": cmd_report, "dump": cmd_dump}[args.cmd](args)


if __name__ == "__main__":
    main()
