"""Merges what bench/gpu.sh measured into one JSON and one Markdown file (gpu-bench.json,
gpu-bench.md): model rows, loader rows, end to end, time to the first step, the targets of
issue 15 and every step's status. A row whose step failed, timed out or was skipped is still
there, with its status and no numbers.

    python3 -m bench.gpu_report --res bench-work/run-XXXXXX --out $OUT   # bench/gpu.sh calls this
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

PARTS = ("loaders", "model", "e2e", "cand", "b256", "eager", "ramp")


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


def model_rows(args: argparse.Namespace, steps: dict) -> tuple[list[dict], dict[tuple, dict]]:
    """One row per variant of every model step, and the measured rows by (variant, batch, compiled|eager)."""
    b1, b2 = args.batches
    model_steps = [
        (f"model-b{b1}", "model", b1, args.compile, ["tv", "ours-se", "ours-se-eff"]),
        ("model-cand", "cand", b1, args.compile, ["ours-se-sharedbn", "cand-se-sumfc"]),
        (f"model-b{b2}", "b256", b2, args.compile, ["tv", "ours-se"]),
        ("model-eager", "eager", b1, "none", ["tv", "ours-se", "ours-se-eff"]),
    ]
    by_key: dict[tuple, dict] = {}
    rows = []
    for step, part, batch, comp, variants in model_steps:
        if part not in args.parts:
            continue
        data = load_json(args.res / f"{step}.json") or {}
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
                row.update(measured(r, args.smoke))
                by_key[(v, batch, "eager" if part == "eager" else "compiled")] = row
            rows.append(row)
    compare_models(rows, by_key)
    return rows, by_key


def measured(r: dict, smoke: bool) -> dict:
    """The numbers of one bench/model.py result that a model row keeps."""
    out = {"img_s": r["img_s"], "step_ms": r["step_ms"], "warmup_s": r.get("warmup_s"), "params": r.get("params")}
    if "peak_gib" in r:
        out.update(peak=r["peak_gib"], peak_unit="GiB")
    elif "peak_mib" in r and not smoke:
        out.update(peak=r["peak_mib"], peak_unit="MiB (CPU: MemTracker, one eager step)")
    for k in ("max_batch", "max_batch_estimate"):
        if k in r:
            out[k] = r[k]
    return out


def compare_models(rows: list[dict], by_key: dict[tuple, dict]) -> None:
    """Each measured row's speed and memory against tv and ours-se at its batch and compile."""
    for row in rows:
        if "img_s" not in row:
            continue
        for ref, name in (("tv", "tv"), ("ours-se", "ours_se")):
            other = by_key.get((ref, row["batch"], "eager" if row["part"] == "eager" else "compiled"))
            if other is not None and other is not row:
                row[f"vs_{name}"] = ratio(row["img_s"], other["img_s"])
                row[f"mem_vs_{name}"] = ratio(row.get("peak"), other.get("peak"))


def cold_runs(res: Path, phase_a: list[str]) -> dict[tuple, tuple]:
    """(variant, batch) -> (its phase-A result or None, the step). Phase-A steps are named
    cold-b<batch>-<variant>[+<variant>...]."""
    runs: dict[tuple, tuple] = {}
    for name in phase_a:
        if not name.startswith("cold-b"):
            continue
        batch, variants = name[len("cold-b") :].split("-", 1)
        found = {r["variant"]: r for r in (load_json(res / f"{name}.json") or {}).get("results", [])}
        for v in variants.split("+"):
            runs[(v, int(batch))] = (found.get(v), name)
    return runs


def startup_rows(args: argparse.Namespace, steps: dict, models: list[dict], e2e: dict, cache: dict) -> list[dict]:
    """Time to the first step: phase A (cold caches, several compiles at once) against phase B
    (warm), for every compiled model row and the trainer (``e2e``: its cold and warm windows)."""
    phase_a = [n for n in steps if n.startswith("cold-") or n == "e2e-cold"]
    cold = cold_runs(args.res, phase_a)
    rows = []
    for row in models:
        if row["part"] == "eager":
            continue
        cold_r, cold_step = cold.get((row["variant"], row["batch"]), (None, None))
        rows.append(
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
    if "e2e" in args.parts:
        e2e_cold, e2e_warm = e2e["e2e-cold"], e2e["e2e-warm"]
        rows.append(
            {
                "id": f"trainer ({args.compile})",
                "kind": "accelerate launch trainer/main.py (startup_s: process start to the end of step 1)",
                "cold_s": e2e_cold.get("startup_s"),
                "warm_s": e2e_warm.get("startup_s"),
                "cold_status": data_status(e2e_cold.get("startup_s") is not None, steps, "e2e-cold"),
                "warm_status": data_status(e2e_warm.get("startup_s") is not None, steps, "e2e-warm"),
                "cold_cache": "cold",
                "cold_concurrent": len(phase_a),
            }
        )
    return rows


def loader_rows(args: argparse.Namespace, steps: dict, ref_rate: float | None) -> list[dict]:
    """bench/train.py --no-end-to-end: each decode x workers loader, then its eager model-only step."""
    if "loaders" not in args.parts:
        return []
    data = load_json(args.res / "loaders.json") or {}
    status = data_status(data, steps, "loaders")
    eager = data.get("model_only")
    rows = []
    for decode in ("workers", "device"):
        for n in args.workers:
            rate = (data.get("loaders") or {}).get(f"loader, decode={decode}, {n} workers")
            rows.append(
                {
                    "id": f"loader, decode={decode}, {n} workers",
                    "img_s": rate,
                    "vs_model_only": ratio(rate, ref_rate),
                    "vs_model_only_eager": ratio(rate, eager),
                    "status": "ok" if rate is not None else status,
                }
            )
    rows.append(
        {
            "id": "model-only, trainer config, eager (bench/train.py)",
            "img_s": eager,
            "vs_model_only": ratio(eager, ref_rate),
            "vs_model_only_eager": 1.0 if eager else None,
            "status": "ok" if eager is not None else status,
        }
    )
    return rows


def e2e_rows(args: argparse.Namespace, steps: dict, e2e: dict, ref_rate: float | None) -> list[dict]:
    """The real trainer, warm then cold (``e2e``: each step's windows)."""
    if "e2e" not in args.parts:
        return []
    rows = []
    for name, step in (
        ("trainer, warm compile cache", "e2e-warm"),
        ("trainer, cold (phase A, other compiles running)", "e2e-cold"),
    ):
        data = e2e[step]
        status = data_status(data, steps, step)
        if data and step_status(steps, step) != "ok":  # the windows were logged; what came after them did not finish
            status = f"windows logged, then {step_status(steps, step)}"
        rows.append(
            {
                "id": name,
                "step": step,
                **data,
                "vs_model_only": ratio(data.get("img_s"), ref_rate),
                "wall_s": steps.get(step, {}).get("seconds"),
                "status": status,
            }
        )
    return rows


def ramp_rows(args: argparse.Namespace, steps: dict) -> list[dict]:
    """bench/resize.py's epochs, fixed size beside progressive resizing, and the total."""
    if "ramp" not in args.parts:
        return []
    data = load_json(args.res / "ramp.json")
    if not data:
        return [{"epoch": "all", "status": step_status(steps, "ramp")}]
    rows = [
        {"epoch": a["epoch"], "fixed": a, "ramp": b, "ratio": ratio(b["seconds"], a["seconds"])}
        for a, b in zip(data["fixed"], data["ramp"])
    ]
    total = {k: sum(e["seconds"] for e in data[k]) for k in ("fixed", "ramp")}
    return rows + [{"epoch": "all", "total": total, "ratio": data["ratio"], "status": "ok"}]


def target(name: str, value, goal: str, met: bool | None, note: str = "") -> dict:
    return {"target": name, "value": value, "goal": goal, "met": met, "note": note}


def model_targets(args: argparse.Namespace, by_key: dict[tuple, dict]) -> list[dict]:
    """SE against torchvision at both batches; the efficient variant's memory and speed; the candidates."""
    b1, b2 = args.batches
    compiled = args.compile
    targets = []
    for b in (b1, b2):
        se, tv = by_key.get(("ours-se", b, "compiled")), by_key.get(("tv", b, "compiled"))
        if ("model" if b == b1 else "b256") in args.parts:
            r = ratio(se and se["img_s"], tv and tv["img_s"])
            targets.append(
                target(
                    f"SE on vs torchvision, {compiled}, batch {b}",
                    r,
                    ">= 1.0x (stretch 1.2x)",
                    None if r is None else r >= 1.0,
                )
            )
    eff, se = by_key.get(("ours-se-eff", b1, "compiled")), by_key.get(("ours-se", b1, "compiled"))
    if "model" in args.parts:
        m = ratio(eff and eff.get("peak"), se and se.get("peak"))
        s = ratio(eff and eff["img_s"], se and se["img_s"])
        targets.append(
            target(
                f"efficient: memory vs ours-se, {compiled}, batch {b1}", m, "<= 0.55x", None if m is None else m <= 0.55
            )
        )
        targets.append(
            target(
                f"efficient: speed vs ours-se, {compiled}, batch {b1}", s, ">= 0.85x", None if s is None else s >= 0.85
            )
        )
    if "cand" in args.parts:
        for v, what in (("ours-se-sharedbn", "model.shared_bn"), ("cand-se-sumfc", "SE candidate (sum-FC)")):
            c = by_key.get((v, b1, "compiled"))
            r = ratio(c and c["img_s"], se and se["img_s"])
            targets.append(
                target(
                    f"{what} vs ours-se, {compiled}, batch {b1}",
                    r,
                    "> 1.0x pays (beyond run-to-run noise)",
                    None if r is None else r > 1.0,
                    "pays: make it the default; else delete it",
                )
            )
    return targets


def pipeline_targets(loaders: list[dict], e2e: list[dict], startup: list[dict], ref_name: str) -> list[dict]:
    """Each loader and the warm trainer against model-only; the trainer's time to the first step."""
    targets = []
    for row in loaders[:-1]:
        v = row["vs_model_only"]
        targets.append(
            target(
                f"{row['id']} vs model-only", v, ">= 1.5x", None if v is None else v >= 1.5, f"model-only = {ref_name}"
            )
        )
    if e2e:
        r = e2e[0]["vs_model_only"]
        targets.append(
            target(
                "end to end (trainer, warm) vs model-only",
                r,
                ">= 0.9x",
                None if r is None else r >= 0.9,
                f"model-only = {ref_name}",
            )
        )
    for row in startup:
        if row["id"].startswith("trainer"):
            for k in ("cold_s", "warm_s"):
                v = row[k]
                targets.append(
                    target(
                        f"time to first step, trainer, {k[:-2]}",
                        v,
                        "<= 30 s (issue 15 part 2)",
                        None if v is None else v <= 30,
                    )
                )
    return targets


def build(args: argparse.Namespace) -> dict:
    res, steps = args.res, load_steps(args.res)
    env = load_json(res / "env.json") or {}
    cache = load_json(res / "cache.json") or {}
    models, by_key = model_rows(args, steps)
    e2e = {step: windows_rate(res / f"{step}-metrics.jsonl") for step in ("e2e-cold", "e2e-warm")}
    startup = startup_rows(args, steps, models, e2e, cache)
    reference = by_key.get(("ours-se", args.batches[0], "compiled"))
    ref_rate = reference["img_s"] if reference else None
    ref_name = f"ours-se b{args.batches[0]} {args.compile} (bench/model.py)"
    loaders = loader_rows(args, steps, ref_rate)
    end_to_end = e2e_rows(args, steps, e2e, ref_rate)
    meta = {
        **env,
        "smoke": args.smoke,
        "command": args.command,
        "budget_s": args.budget,
        "elapsed_s": args.elapsed,
        "parts": args.parts,
        "batches": args.batches,
        "compile": args.compile,
        "loader_workers": args.workers,
        "model_only_reference": ref_name,
        "model_cache": cache.get("model_cache"),
        "compile_threads": cache.get("compile_threads"),
    }
    return {
        "meta": meta,
        "rows": {
            "model": models,
            "loader": loaders,
            "end_to_end": end_to_end,
            "startup": startup,
            "ramp": ramp_rows(args, steps),
        },
        "targets": model_targets(args, by_key) + pipeline_targets(loaders, end_to_end, startup, ref_name),
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


def header(m: dict) -> list[str]:
    """Title, machine, versions, command and what every model row measures."""
    return [
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
    ]


def section(title: str, intro: list[str], columns: list[str], rows: list[str]) -> list[str]:
    """A `## title` section: its intro paragraphs, then a table of ``columns`` and ``rows``."""
    lines = [f"## {title}", ""]
    for paragraph in intro:
        lines += [paragraph, ""]
    return lines + ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns), *rows]


def model_table(rows: list[dict]) -> list[str]:
    columns = "variant,batch,compile,img/s,step ms,peak,vs tv,mem vs tv,vs ours-se,mem vs ours-se,largest batch,status"
    cells = []
    for r in rows:
        peak = f"{r['peak']:.2f} {r['peak_unit'].split()[0]}" if r.get("peak") is not None else "—"
        biggest = r.get("max_batch", r.get("max_batch_estimate"))
        status = r["status"] + (f" ({r['concurrent_jobs']} phase-A jobs running)" if r.get("concurrent_jobs") else "")
        comp = r["compile"] + (" (eager step)" if r["part"] == "eager" and r["compile"] != "none" else "")
        cells.append(
            f"| {r['variant']} | {r['batch']} | {comp} | {fmt(r.get('img_s'), 'rate')} | {fmt(r.get('step_ms'), 's')} "
            f"| {peak} | {fmt(r.get('vs_tv'), 'x')} | {fmt(r.get('mem_vs_tv'), 'x')} | {fmt(r.get('vs_ours_se'), 'x')} "
            f"| {fmt(r.get('mem_vs_ours_se'), 'x')} | {fmt(biggest)} | {status} |"
        )
    return section("Model training step (bench/model.py)", [], columns.split(","), cells) if rows else []


def loader_table(rows: list[dict], reference: str) -> list[str]:
    intro = [f"model-only = {reference}; eager = the trainer config's step in bench/train.py."]
    columns = ["measure", "img/s", "vs model-only", "vs model-only eager", "status"]
    cells = [
        f"| {r['id']} | {fmt(r['img_s'], 'rate')} | {fmt(r['vs_model_only'], 'x')} | {fmt(r['vs_model_only_eager'], 'x')} | {r['status']} |"
        for r in rows
    ]
    return section("Loader alone vs model-only (bench/train.py --no-end-to-end)", intro, columns, cells) if rows else []


def e2e_table(rows: list[dict]) -> list[str]:
    title = "End to end (`accelerate launch trainer/main.py`, 1 epoch, median of logged windows)"
    columns = ["run", "img/s", "vs model-only", "windows", "first step s", "peak GPU GiB", "wall s", "status"]
    cells = [
        f"| {r['id']} | {fmt(r.get('img_s'), 'rate')} | {fmt(r.get('vs_model_only'), 'x')} | {fmt(r.get('windows'))} "
        f"| {fmt(r.get('startup_s'), 's')} | {fmt(r.get('gpu_mem_gib'))} | {fmt(r.get('wall_s'))} | {r['status']} |"
        for r in rows
    ]
    return section(title, [], columns, cells) if rows else []


def startup_table(rows: list[dict]) -> list[str]:
    intro = [
        "Cold: phase A, empty caches, all phase-A compiles at once (the count is in the note). "
        "Warm: phase B, the same setting alone on the cache phase A left."
    ]
    cells = []
    for r in rows:
        note = f"cold: {r['cold_status']}, cache {r['cold_cache']}, {r['cold_concurrent']} jobs at once; warm: {r['warm_status']}"
        cells.append(f"| {r['id']} | {r['kind']} | {fmt(r['cold_s'], 's')} | {fmt(r['warm_s'], 's')} | {note} |")
    columns = ["setting", "measured as", "cold s", "warm s", "note"]
    return section("Time to the first step", intro, columns, cells) if rows else []


PART_OF_STEP = {
    "shards": "loaders",
    "loaders": "loaders",
    "e2e-cold": "e2e",
    "e2e-warm": "e2e",
    "model-cand": "cand",
    "model-eager": "eager",
    "ramp": "ramp",
}


def part_of(name: str, batches: list[int]) -> str | None:
    """The --parts part that measures step ``name`` again (None: no part does, e.g. preflight)."""
    part = PART_OF_STEP.get(name) or (
        "b256" if name == f"model-b{batches[1]}" else "model" if name.startswith("model-b") else None
    )
    if name.startswith("cold-b"):
        batch, variants = name[len("cold-b") :].split("-", 1)
        part = (
            "b256"
            if int(batch) == batches[1]
            else "cand"
            if ("sharedbn" in variants or "sumfc" in variants)
            else "model"
        )
    return part


def unfinished_note(steps: list[dict], batches: list[int]) -> list[str]:
    """How many steps did not finish, and the --parts that would measure what they left out."""
    bad = [s for s in steps if s["status"] != "ok"]
    if not bad:
        return []
    parts = []
    for s in bad:
        part = part_of(s["name"], batches)
        if part and part not in parts:
            parts.append(part)
    return [
        f"**{len(bad)} of {len(steps)} steps did not finish** (table Steps). "
        + (f"To measure what is missing: `bash bench/gpu.sh --parts {','.join(parts)}`" if parts else "")
    ]


def targets_table(targets: list[dict]) -> list[str]:
    cells = []
    for t in targets:
        value = fmt(t["value"], "s" if "time" in t["target"] else "x")
        cells.append(f"| {t['target']} | {value} | {t['goal']} | {met(t['met'])} | {t['note']} |")
    return section("Targets", [], ["target", "value", "goal", "met", "note"], cells)


def steps_table(steps: list[dict]) -> list[str]:
    cells = [
        f"| {s['name']} | {s['status']} | {s['seconds']} | {s.get('started_s')} | {s.get('concurrent')} | {s.get('note', '')} |"
        for s in steps
    ]
    return section("Steps", [], ["step", "status", "s", "started at s", "jobs running", "note"], cells)


def ramp_table(rows: list[dict]) -> list[str]:
    cells = []
    for r in rows:
        if "total" in r:
            cells.append(f"| all | | {r['total']['fixed']:.1f} | | {r['total']['ramp']:.1f} | {fmt(r['ratio'], 'x')} |")
        elif "fixed" in r:
            a, b = r["fixed"], r["ramp"]
            cells.append(
                f"| {r['epoch']} | {a['image_size']} | {a['seconds']:.1f} | {b['image_size']} | {b['seconds']:.1f} "
                f"| {fmt(r['ratio'], 'x')} |"
            )
        else:
            cells.append(f"| all | | {r['status']} | | | |")
    intro = [
        "The trainer eager, the same shards: train seconds per epoch at a fixed size and with the ramp (bench/resize.py)."
    ]
    columns = ["epoch", "fixed px", "fixed s", "ramp px", "ramp s", "ramp / fixed"]
    return section("Progressive resizing", intro, columns, cells) if rows else []


def markdown(report: dict) -> str:
    """The report's sections, a blank line between them; a section without rows is left out."""
    m, rows = report["meta"], report["rows"]
    sections = [
        header(m),
        model_table(rows["model"]),
        loader_table(rows["loader"], m["model_only_reference"]),
        e2e_table(rows["end_to_end"]),
        startup_table(rows["startup"]),
        ramp_table(rows.get("ramp", [])),
        unfinished_note(report["steps"], m["batches"]),
        targets_table(report["targets"]),
        steps_table(report["steps"]),
    ]
    return "\n\n".join("\n".join(lines) for lines in sections if lines) + "\n"


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
