"""Merges what bench/gpu.sh measured into one JSON and one Markdown file (gpu-bench.json,
gpu-bench.md): model rows, loader rows, end to end, time to the first step, the targets of
issue 15 and every step's status. A row whose step failed, timed out or was skipped is still
there, with its status and no numbers.

    python3 bench/gpu_report.py --res bench-work/run-XXXXXX --out $OUT   # bench/gpu.sh calls this
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

PARTS = ("loaders", "model", "e2e", "cand", "b256", "eager")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--res", type=Path, required=True, help="the run's folder: steps.jsonl and the steps' JSON")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--batches", default="128,256")
    p.add_argument("--compile", default="reduce-overhead")
    p.add_argument("--workers", default="15,4")
    p.add_argument("--parts", default=",".join(PARTS))
    p.add_argument("--budget", type=float, default=None)
    p.add_argument("--elapsed", type=float, default=None)
    p.add_argument("--command", default="bash bench/gpu.sh")
    p.add_argument("--smoke", action="store_true", help="CPU smoke run: memory not measured, numbers not measurements")
    args = p.parse_args()
    args.batches = [int(b) for b in args.batches.split(",")]
    args.workers = [int(w) for w in args.workers.split(",")]
    args.parts = args.parts.split(",")
    return args


def load_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def load_steps(res: Path) -> dict[str, dict]:
    steps = {}
    path = res / "steps.jsonl"
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        steps[record["name"]] = record
    return steps


def step_status(steps: dict, name: str) -> str:
    record = steps.get(name)
    if record is None:
        return "not run"
    return (
        record["status"]
        if not record.get("note") or record["status"] == "ok"
        else f"{record['status']}: {record['note']}"
    )


def data_status(has_data, steps: dict, name: str | None) -> str:
    """ok when the step left its numbers; else why not."""
    if has_data:
        return "ok"
    status = step_status(steps, name) if name else "not run"
    return "no results (see the step's log)" if status == "ok" else status


def ratio(a, b):
    return a / b if a is not None and b else None


def windows_rate(path: Path) -> dict:
    """The trainer's metrics.jsonl: img/s as bench/train.py takes it (median of the logged
    windows, the first (start-up) and the last (short) dropped), its time to the first step."""
    if not path.exists():
        return {}
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    trains = [r for r in records if r.get("kind") == "train"]
    if not trains:
        return {}
    rates = [r["img_per_s"] for r in trains]
    kept = rates[1:-1] or rates[1:] or rates
    out = {"img_s": statistics.median(kept), "windows": len(kept), "startup_s": trains[0].get("startup_s")}
    mem = [r["gpu_mem_gib"] for r in trains if "gpu_mem_gib" in r]
    if mem:
        out["gpu_mem_gib"] = max(mem)
    return out


def build(args: argparse.Namespace) -> dict:
    res, steps = args.res, load_steps(args.res)
    b1, b2 = args.batches
    env = load_json(res / "env.json") or {}
    cache = load_json(res / "cache.json") or {}
    compiled = args.compile
    model_steps = [
        (f"model-b{b1}", "model", b1, compiled, ["tv", "ours-se", "ours-se-eff"]),
        ("model-cand", "cand", b1, compiled, ["ours-se-sharedbn", "cand-se-sumfc"]),
        (f"model-b{b2}", "b256", b2, compiled, ["tv", "ours-se"]),
        ("model-eager", "eager", b1, "none", ["tv", "ours-se", "ours-se-eff"]),
    ]
    by_key: dict[tuple, dict] = {}
    model_rows = []
    for step, part, batch, comp, variants in model_steps:
        if part not in args.parts:
            continue
        data = load_json(res / f"{step}.json") or {}
        found = {r["variant"]: r for r in data.get("results", [])}
        for v in variants:
            r = found.get(v)
            row = {
                "id": f"{v} b{batch} {comp}",
                "part": part,
                "step": step,
                "variant": v,
                "batch": batch,
                "compile": comp,
                "status": data_status(r, steps, step),
                "concurrent_jobs": steps.get(step, {}).get("concurrent", 0),
            }
            if r:
                row.update(img_s=r["img_s"], step_ms=r["step_ms"], warmup_s=r.get("warmup_s"), params=r.get("params"))
                if "peak_gib" in r:
                    row.update(peak=r["peak_gib"], peak_unit="GiB")
                elif "peak_mib" in r and not args.smoke:
                    row.update(peak=r["peak_mib"], peak_unit="MiB (CPU: MemTracker, one eager step)")
                for k in ("max_batch", "max_batch_estimate"):
                    if k in r:
                        row[k] = r[k]
                by_key[(v, batch, "eager" if part == "eager" else "compiled")] = row
            model_rows.append(row)
    for row in model_rows:
        if "img_s" not in row:
            continue
        for ref, name in (("tv", "tv"), ("ours-se", "ours_se")):
            other = by_key.get((ref, row["batch"], "eager" if row["part"] == "eager" else "compiled"))
            if other is not None and other is not row:
                row[f"vs_{name}"] = ratio(row["img_s"], other["img_s"])
                row[f"mem_vs_{name}"] = ratio(row.get("peak"), other.get("peak"))

    # time to the first step: phase A (cold caches, several compiles at once) against phase B (warm).
    # Phase-A steps are named cold-b<batch>-<variant>[+<variant>...].
    phase_a = [n for n in steps if n.startswith("cold-") or n == "e2e-cold"]
    cold_runs: dict[tuple, tuple] = {}
    for name in phase_a:
        if not name.startswith("cold-b"):
            continue
        batch, variants = name[len("cold-b") :].split("-", 1)
        found = {r["variant"]: r for r in (load_json(res / f"{name}.json") or {}).get("results", [])}
        for v in variants.split("+"):
            cold_runs[(v, int(batch))] = (found.get(v), name)
    startup_rows = []
    for row in model_rows:
        if row["part"] == "eager":
            continue
        cold_r, cold_step = cold_runs.get((row["variant"], row["batch"]), (None, None))
        startup_rows.append(
            {
                "id": f"{row['variant']} b{row['batch']} {row['compile']}",
                "kind": "bench/model.py (compile + warm-up steps, in process)",
                "cold_s": (cold_r or {}).get("warmup_s"),
                "warm_s": row.get("warmup_s"),
                "cold_status": data_status(cold_r, steps, cold_step),
                "warm_status": row["status"],
                "cold_cache": cache.get("model_cache", "cold"),
                "cold_concurrent": len(phase_a),
            }
        )
    e2e_cold, e2e_warm = windows_rate(res / "e2e-cold-metrics.jsonl"), windows_rate(res / "e2e-warm-metrics.jsonl")
    if "e2e" in args.parts:
        startup_rows.append(
            {
                "id": f"trainer ({compiled})",
                "kind": "accelerate launch trainer/main.py (startup_s: process start to the end of step 1)",
                "cold_s": e2e_cold.get("startup_s"),
                "warm_s": e2e_warm.get("startup_s"),
                "cold_status": data_status(e2e_cold.get("startup_s") is not None, steps, "e2e-cold"),
                "warm_status": data_status(e2e_warm.get("startup_s") is not None, steps, "e2e-warm"),
                "cold_cache": "cold",
                "cold_concurrent": len(phase_a),
            }
        )

    reference = by_key.get(("ours-se", b1, "compiled"))
    ref_rate = reference["img_s"] if reference else None
    ref_name = f"ours-se b{b1} {compiled} (bench/model.py)"
    loader_rows = []
    if "loaders" in args.parts:
        data = load_json(res / "loaders.json") or {}
        status = data_status(data, steps, "loaders")
        eager = data.get("model_only")
        for decode in ("workers", "device"):
            for n in args.workers:
                rate = (data.get("loaders") or {}).get(f"loader, decode={decode}, {n} workers")
                loader_rows.append(
                    {
                        "id": f"loader, decode={decode}, {n} workers",
                        "img_s": rate,
                        "vs_model_only": ratio(rate, ref_rate),
                        "vs_model_only_eager": ratio(rate, eager),
                        "status": "ok" if rate is not None else status,
                    }
                )
        loader_rows.append(
            {
                "id": "model-only, trainer config, eager (bench/train.py)",
                "img_s": eager,
                "vs_model_only": ratio(eager, ref_rate),
                "vs_model_only_eager": 1.0 if eager else None,
                "status": "ok" if eager is not None else status,
            }
        )
    e2e_rows = []
    if "e2e" in args.parts:
        for name, data, step in (
            ("trainer, warm compile cache", e2e_warm, "e2e-warm"),
            ("trainer, cold (phase A, other compiles running)", e2e_cold, "e2e-cold"),
        ):
            status = data_status(data, steps, step)
            if (
                data and step_status(steps, step) != "ok"
            ):  # the windows were logged; what came after them did not finish
                status = f"windows logged, then {step_status(steps, step)}"
            e2e_rows.append(
                {
                    "id": name,
                    "step": step,
                    **data,
                    "vs_model_only": ratio(data.get("img_s"), ref_rate),
                    "wall_s": steps.get(step, {}).get("seconds"),
                    "status": status,
                }
            )

    targets = []

    def target(name, value, goal, met, note=""):
        targets.append({"target": name, "value": value, "goal": goal, "met": met, "note": note})

    for b in (b1, b2):
        se, tv = by_key.get(("ours-se", b, "compiled")), by_key.get(("tv", b, "compiled"))
        if ("model" if b == b1 else "b256") in args.parts:
            r = ratio(se and se["img_s"], tv and tv["img_s"])
            target(
                f"SE on vs torchvision, {compiled}, batch {b}",
                r,
                ">= 1.0x (stretch 1.2x)",
                None if r is None else r >= 1.0,
            )
    eff, se = by_key.get(("ours-se-eff", b1, "compiled")), by_key.get(("ours-se", b1, "compiled"))
    if "model" in args.parts:
        m = ratio(eff and eff.get("peak"), se and se.get("peak"))
        s = ratio(eff and eff["img_s"], se and se["img_s"])
        target(f"efficient: memory vs ours-se, {compiled}, batch {b1}", m, "<= 0.55x", None if m is None else m <= 0.55)
        target(f"efficient: speed vs ours-se, {compiled}, batch {b1}", s, ">= 0.85x", None if s is None else s >= 0.85)
    if "cand" in args.parts:
        for v, what in (("ours-se-sharedbn", "model.shared_bn"), ("cand-se-sumfc", "SE candidate (sum-FC)")):
            c = by_key.get((v, b1, "compiled"))
            r = ratio(c and c["img_s"], se and se["img_s"])
            target(
                f"{what} vs ours-se, {compiled}, batch {b1}",
                r,
                "> 1.0x pays (beyond run-to-run noise)",
                None if r is None else r > 1.0,
                "pays: make it the default; else delete it",
            )
    for row in loader_rows[:-1]:
        target(
            f"{row['id']} vs model-only",
            row["vs_model_only"],
            ">= 1.5x",
            None if row["vs_model_only"] is None else row["vs_model_only"] >= 1.5,
            f"model-only = {ref_name}",
        )
    if e2e_rows:
        r = e2e_rows[0]["vs_model_only"]
        target(
            "end to end (trainer, warm) vs model-only",
            r,
            ">= 0.9x",
            None if r is None else r >= 0.9,
            f"model-only = {ref_name}",
        )
    for row in startup_rows:
        if row["id"].startswith("trainer"):
            for k in ("cold_s", "warm_s"):
                v = row[k]
                target(
                    f"time to first step, trainer, {k[:-2]}",
                    v,
                    "<= 30 s (issue 15 part 2)",
                    None if v is None else v <= 30,
                )

    meta = {
        **env,
        "smoke": args.smoke,
        "command": args.command,
        "budget_s": args.budget,
        "elapsed_s": args.elapsed,
        "parts": args.parts,
        "batches": args.batches,
        "compile": compiled,
        "loader_workers": args.workers,
        "model_only_reference": ref_name,
        "model_cache": cache.get("model_cache"),
        "compile_threads": cache.get("compile_threads"),
    }
    return {
        "meta": meta,
        "rows": {"model": model_rows, "loader": loader_rows, "end_to_end": e2e_rows, "startup": startup_rows},
        "targets": targets,
        "steps": list(steps.values()),
    }


def fmt(v, kind="num"):
    if v is None:
        return "—"
    if kind == "x":
        return f"{v:.2f}x"
    if kind == "s":
        return f"{v:.1f}"
    if kind == "rate":
        return f"{v:,.0f}" if v >= 100 else f"{v:.1f}"
    if isinstance(v, float):
        return f"{v:.2f}"
    return f"{v:,}" if isinstance(v, int) else str(v)


def met(v) -> str:
    return {True: "yes", False: "**no**", None: "not measured"}[v]


def markdown(report: dict) -> str:
    m, rows = report["meta"], report["rows"]
    lines = [
        "# bench/gpu.sh results"
        + (" (CPU smoke run: tiny sizes, no compile; not measurements)" if m.get("smoke") else ""),
        "",
        f"- date: {m.get('date', '?')}; machine: {m.get('device', '?')}"
        + (f" ({m['gpu_mem_gib']} GiB, driver {m.get('driver', '?')})" if "gpu_mem_gib" in m else "")
        + f", {m.get('host_cpus', '?')} CPUs, {m.get('mem_gib', '?')} GiB RAM",
        f"- versions: python {m.get('python', '?')}, torch {m.get('torch', '?')}, torchvision {m.get('torchvision', '?')}, "
        f"triton {m.get('triton', '?')}, accelerate {m.get('accelerate', '?')}, timm {m.get('timm', '?')}, "
        f"omegaconf {m.get('omegaconf', '?')}, commit {m.get('commit', '?')}",
        f"- command: `{m['command']}`; {fmt(m.get('elapsed_s'), 's')} s of a {fmt(m.get('budget_s'), 's')} s budget; "
        f"bench/model.py cache at start: {m.get('model_cache')}; inductor compile threads per phase-A process: {m.get('compile_threads')}",
        "- all model rows: synthetic batch, 224 px (CPU smoke: 32 px), bf16 autocast and channels_last on GPU; "
        "forward + cross-entropy + backward + SGD momentum. Peak = max_memory_allocated from before the model is built.",
        "",
    ]
    if rows["model"]:
        lines += [
            "## Model training step (bench/model.py)",
            "",
            "| variant | batch | compile | img/s | step ms | peak | vs tv | mem vs tv | vs ours-se | mem vs ours-se | largest batch | status |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in rows["model"]:
            peak = f"{r['peak']:.2f} {r['peak_unit'].split()[0]}" if r.get("peak") is not None else "—"
            biggest = r.get("max_batch", r.get("max_batch_estimate"))
            status = r["status"] + (
                f" ({r['concurrent_jobs']} phase-A jobs running)" if r.get("concurrent_jobs") else ""
            )
            comp = r["compile"] + (" (eager step)" if r["part"] == "eager" and r["compile"] != "none" else "")
            lines.append(
                f"| {r['variant']} | {r['batch']} | {comp} | {fmt(r.get('img_s'), 'rate')} | {fmt(r.get('step_ms'), 's')} "
                f"| {peak} | {fmt(r.get('vs_tv'), 'x')} | {fmt(r.get('mem_vs_tv'), 'x')} | {fmt(r.get('vs_ours_se'), 'x')} "
                f"| {fmt(r.get('mem_vs_ours_se'), 'x')} | {fmt(biggest)} | {status} |"
            )
        lines.append("")
    if rows["loader"]:
        lines += [
            "## Loader alone vs model-only (bench/train.py --no-end-to-end)",
            "",
            f"model-only = {m['model_only_reference']}; eager = the trainer config's step in bench/train.py.",
            "",
            "| measure | img/s | vs model-only | vs model-only eager | status |",
            "|---|---|---|---|---|",
        ]
        for r in rows["loader"]:
            lines.append(
                f"| {r['id']} | {fmt(r['img_s'], 'rate')} | {fmt(r['vs_model_only'], 'x')} | {fmt(r['vs_model_only_eager'], 'x')} | {r['status']} |"
            )
        lines.append("")
    if rows["end_to_end"]:
        lines += [
            "## End to end (`accelerate launch trainer/main.py`, 1 epoch, median of logged windows)",
            "",
            "| run | img/s | vs model-only | windows | first step s | peak GPU GiB | wall s | status |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in rows["end_to_end"]:
            lines.append(
                f"| {r['id']} | {fmt(r.get('img_s'), 'rate')} | {fmt(r.get('vs_model_only'), 'x')} | {fmt(r.get('windows'))} "
                f"| {fmt(r.get('startup_s'), 's')} | {fmt(r.get('gpu_mem_gib'))} | {fmt(r.get('wall_s'))} | {r['status']} |"
            )
        lines.append("")
    if rows["startup"]:
        lines += [
            "## Time to the first step",
            "",
            "Cold: phase A, empty caches, all phase-A compiles at once (the count is in the note). "
            "Warm: phase B, the same setting alone on the cache phase A left.",
            "",
            "| setting | measured as | cold s | warm s | note |",
            "|---|---|---|---|---|",
        ]
        for r in rows["startup"]:
            note = f"cold: {r['cold_status']}, cache {r['cold_cache']}, {r['cold_concurrent']} jobs at once; warm: {r['warm_status']}"
            lines.append(f"| {r['id']} | {r['kind']} | {fmt(r['cold_s'], 's')} | {fmt(r['warm_s'], 's')} | {note} |")
        lines.append("")
    bad = [s for s in report["steps"] if s["status"] != "ok"]
    if bad:
        part_of = {
            "shards": "loaders",
            "loaders": "loaders",
            "e2e-cold": "e2e",
            "e2e-warm": "e2e",
            "model-cand": "cand",
            "model-eager": "eager",
        }
        parts = []
        for s in bad:
            name = s["name"]
            part = part_of.get(name) or (
                "b256" if name == f"model-b{m['batches'][1]}" else "model" if name.startswith("model-b") else None
            )
            if name.startswith("cold-b"):
                batch, variants = name[len("cold-b") :].split("-", 1)
                part = (
                    "b256"
                    if int(batch) == m["batches"][1]
                    else "cand"
                    if ("sharedbn" in variants or "sumfc" in variants)
                    else "model"
                )
            if part and part not in parts:
                parts.append(part)
        lines += [
            f"**{len(bad)} of {len(report['steps'])} steps did not finish** (table Steps). "
            + (f"To measure what is missing: `bash bench/gpu.sh --parts {','.join(parts)}`" if parts else ""),
            "",
        ]
    lines += ["## Targets", "", "| target | value | goal | met | note |", "|---|---|---|---|---|"]
    for t in report["targets"]:
        value = fmt(t["value"], "s" if "time" in t["target"] else "x")
        lines.append(f"| {t['target']} | {value} | {t['goal']} | {met(t['met'])} | {t['note']} |")
    lines += [
        "",
        "## Steps",
        "",
        "| step | status | s | started at s | jobs running | note |",
        "|---|---|---|---|---|---|",
    ]
    for s in report["steps"]:
        lines.append(
            f"| {s['name']} | {s['status']} | {s['seconds']} | {s.get('started_s')} | {s.get('concurrent')} | {s.get('note', '')} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    args = parse_args()
    report = build(args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu-bench.json").write_text(json.dumps(report, indent=1))
    text = markdown(report)
    (args.out / "gpu-bench.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
