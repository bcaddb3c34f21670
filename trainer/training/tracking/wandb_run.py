"""The wandb side of a run, for the main process only: what each record, table and chart looks
like there, the model artifacts, the data the run used, and trainer.export's artifact.

Offline (the default) and online alike. wandb stages artifact files and tables under
WANDB_DATA_DIR, by default the user's home; here it defaults to RUN_DIR/wandb (they land in
RUN_DIR/wandb/artifacts/staging), so a cluster's small home directory does not fill up and
`wandb sync` finds them beside the offline run it uploads.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

from shards.format import CLASS_PLOT, SIZE_PLOT
from toolbox.errors import EXIT_PREEMPTED, UserError, first_line
from toolbox.redact import redact_text
from trainer.rundir import RUN_FILES, SUMMARIES, WANDB, WEIGHTS
from trainer.training.config import Config, to_dict, wandb_id

STEP = "step"  # every series' x-axis: the optimizer step
SERIES = ("train", "eval", "val", "data")  # the prefixes of everything logged
PER_CLASS = ("precision", "recall", "specificity", "f1", "support")
PREDICTIONS = ("image", "true", "predicted", "probability", "correct")


class WandbRun:
    """This process start's segment of the run's wandb run (a resume adds one more)."""

    def __init__(self, config: Config, classes: list[str], dataset, fresh: bool):
        self.config, self.classes = config, classes
        self.run_dir = Path(config.run.dir)
        run_id = config.wandb.id  # load_config resolves it
        self.dataset = dataset_fields(dataset)
        # Versions earlier starts logged, so that work redone after a resume logs none twice;
        # train.resume=false starts a new timeline, whose steps owe nothing to the old one's.
        self.logged = logged_versions(self.run_dir, run_id) if config.train.resume and config.wandb.log_model else set()
        # Under `wandb agent` the sweep decides project, entity and id (wandb ignores ours, with a
        # warning each), and its runs keep the names wandb gives them.
        sweep = bool(os.environ.get("WANDB_SWEEP_ID"))
        where = {} if sweep else {"project": config.wandb.project, "entity": config.wandb.entity, "id": run_id}
        self.run = start(
            config.wandb.mode,
            self.run_dir,
            **where,
            name=config.wandb.name or config.run.name or (None if sweep else self.run_dir.name),
            group=config.wandb.group,
            tags=list(config.wandb.tags),
            config={**to_dict(config), "dataset": self.dataset},
        )
        declare_metrics(self.run)
        if fresh:
            self.log_data(dataset)

    def log(self, record: dict, best: dict) -> None:
        self.run.log({STEP: record["step"], **view(record, self.classes)}, step=record["step"])
        if best:  # the best so far, exact across resumes (a summary="max" sees one process start's values)
            self.run.summary.update(best)

    def log_config_change(self, step: int, changed: dict) -> None:
        history = list(self.run.config.get("config_changes") or [])
        self.run.config.update({"config_changes": [*history, {"step": step, **changed}]}, allow_val_change=True)

    def log_predictions(self, rows: list[tuple], step: int) -> None:
        import wandb

        table = wandb.Table(columns=list(PREDICTIONS))
        for image, true, predicted, probability in rows:
            table.add_data(wandb.Image(image), true, predicted, probability, true == predicted)
        self.run.log({STEP: step, "val/predictions": table}, step=step)

    def log_model(self, step: int, aliases: list[str], evaluation: dict) -> None:
        """The weights named by `aliases` (best, final) with what evaluate/predict/export need
        beside them: the artifact, fetched into a folder, is a run dir they accept."""
        import wandb

        name = f"model-{self.run.id}"
        if not self.config.wandb.log_model or (name, step) in self.logged:
            return
        metadata = {"step": step, **{k: evaluation.get(k) for k in ("epoch", "top1", "top5", "loss", "num_samples")}}
        artifact = wandb.Artifact(name, type="model", metadata={**metadata, "dataset": self.dataset})
        for file in [WEIGHTS[alias] for alias in aliases] + list(RUN_FILES):
            artifact.add_file(str(self.run_dir / file), name=file, skip_cache=True)  # copied into staging now
        self.run.log_artifact(artifact, aliases=[*aliases, f"step-{step}"])
        self.logged.add((name, step))

    def log_data(self, dataset) -> None:
        """make_shards' plots and skipped-file count, once per run (not again on a resume)."""
        import wandb
        from PIL import Image

        media = {}
        for key, file in (("data/class_distribution", CLASS_PLOT), ("data/image_sizes", SIZE_PLOT)):
            raw = dataset.read_extra(file)
            if raw is None:
                continue
            try:
                media[key] = wandb.Image(Image.open(io.BytesIO(raw)), caption=file)
            except OSError:  # not an image after all: the plots are extras
                continue
        self.run.log({STEP: 0, **media}, step=0)
        self.run.summary["data/skipped_files"] = self.dataset["skipped_files"]

    def summarize(self, summary: dict) -> None:
        self.run.summary.update(summary)

    def finish(self, preempted: bool = False) -> None:
        """A preempted run is marked so (wandb's contract: a sweep hands a preempting run that exits
        non-zero to the next agent, which continues it; the UI shows it as preempted, not failed)."""
        if preempted:
            self.run.mark_preempting()
        self.run.finish(exit_code=EXIT_PREEMPTED if preempted else 0)


TRAINING_HINT = "use wandb.mode=offline and `wandb sync` later, or wandb.mode=disabled"
INIT_TIMEOUT_S = 90.0  # wandb's own default, now said out loud


def start(mode: str, run_dir: Path, hint: str = TRAINING_HINT, **init):
    import wandb

    os.environ.setdefault("WANDB_SILENT", "true")
    os.environ.setdefault("WANDB_DATA_DIR", str(run_dir.resolve() / WANDB))  # staging: see the module docstring
    argv = sys.argv
    sys.argv = [redact_text(arg) for arg in argv]  # wandb records the command line: no URL token goes with it
    settings = wandb.Settings(init_timeout=INIT_TIMEOUT_S)
    if mode == "online":  # without a network wandb waits silently for its timeout: say what for, first
        server = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")
        print(f"wandb: connecting to {server} (up to {INIT_TIMEOUT_S:.0f} s; {hint})", flush=True)
    try:
        return wandb.init(dir=str(run_dir), mode=mode, resume="allow", settings=settings, **init)
    except Exception as e:  # no login, no network, a bad entity: say so before any training
        raise UserError(f"wandb ({mode}) could not start: {first_line(e)} — {hint}") from e
    finally:
        sys.argv = argv


def declare_metrics(run) -> None:
    """Every series against the step; best-of summaries where the last value says little."""
    run.define_metric(STEP)
    for prefix in SERIES:
        run.define_metric(f"{prefix}/*", step_metric=STEP)
    for name, summary in SUMMARIES.items():
        run.define_metric(name, step_metric=STEP, summary=summary)


def view(record: dict, classes: list[str]) -> dict:
    """Flat scalars for charts; for an eval record also the per-class table with its F1 bar
    chart, and the confusion matrix."""
    kind = record["kind"]
    flat = {f"{kind}/{k}": v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
    if "macro" in record:
        flat.update({f"{kind}/macro_{k}": v for k, v in record["macro"].items()})
    if "per_class" in record:
        flat.update(per_class_view(kind, record["per_class"]))
    if "confusion" in record:
        flat[f"{kind}/confusion"] = confusion_view(record["confusion"], classes)
    return flat


def per_class_view(kind: str, per_class: dict) -> dict:
    """A row per class (named as given, in any script) and a bar chart of its F1 column."""
    import wandb

    rows = [[name, *(scores[k] for k in PER_CLASS)] for name, scores in per_class.items()]
    table = wandb.Table(columns=["class", *PER_CLASS], data=rows)
    return {f"{kind}/per_class": table, f"{kind}/per_class_f1": wandb.plot.bar(table, "class", "f1", "F1 per class")}


def confusion_view(confusion: list[list[int]], classes: list[str]):
    import wandb

    return wandb.plot.confusion_matrix(
        y_true=[t for t, row in enumerate(confusion) for p, n in enumerate(row) for _ in range(n)],
        preds=[p for t, row in enumerate(confusion) for p, n in enumerate(row) for _ in range(n)],
        class_names=classes,
    )


def dataset_fields(dataset) -> dict:
    """What the run trained on, for the run's config (the runs table groups by these)."""
    manifest = dataset.manifest
    return {
        "location": dataset.shown,  # without a URL's secrets
        "manifest_sha256": manifest.sha256,
        "classes": manifest.num_classes,
        "train_samples": manifest.splits["train"].num_samples if "train" in manifest.splits else 0,
        "val_samples": manifest.splits["val"].num_samples if "val" in manifest.splits else 0,
        "skipped_files": len(manifest.skipped),
        "duplicate_groups": len(manifest.duplicates),
        "mean": manifest.mean,
        "std": manifest.std,
        "created": manifest.created,
    }


def logged_versions(run_dir: Path, run_id: str) -> set[tuple[str, int]]:
    """(artifact, step) of each version that earlier starts of the run put in their transaction
    logs, read with wandb's own reader. The log is what `wandb sync` uploads: a start killed
    before wandb flushed it left nothing there, so its versions are logged again (a list kept
    beside the run would claim them)."""
    logs = sorted((run_dir / WANDB).glob(f"*run-*-{run_id}/run-{run_id}.wandb"))
    readers = [
        subprocess.Popen(
            [sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(log)],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            encoding="utf-8",
            errors="replace",
        )
        for log in logs
    ]
    found = set()
    for reader in readers:
        for line in reader.stdout:
            if '"type":"artifact"' in line:
                found |= versions(json.loads(line)["artifact"])
        reader.wait()
    return found


def versions(artifact: dict) -> set[tuple[str, int]]:
    """An artifact record's (name, step) from its step-N alias; empty for one without."""
    steps = [alias[5:] for alias in artifact.get("aliases", []) if alias.startswith("step-")]
    return {(artifact["name"], int(step)) for step in steps if step.isdigit()}


def log_export(run_dir: Path, config: Config, files: list[Path], alias: str | None, metadata: dict) -> str | None:
    """trainer.export's files as an `exported-model` artifact of the run they came from: the
    same wandb id, one more segment of it. -> the artifact's name; None when the run has wandb
    or model uploads off."""
    if config.wandb.mode == "disabled" or not config.wandb.log_model:
        return None
    import wandb

    run_id = config.wandb.id or wandb_id(run_dir)  # runs from before config.yaml recorded the id
    hint = "the export files are written; pass --no-wandb to leave wandb out"
    run = start(config.wandb.mode, run_dir, hint, project=config.wandb.project, entity=config.wandb.entity, id=run_id)
    try:
        artifact = wandb.Artifact(f"exported-model-{run_id}", type="exported-model", metadata=metadata)
        for path in files:
            artifact.add_file(str(path), name=path.name, skip_cache=True)
        run.log_artifact(artifact, aliases=[alias] if alias else None)
    finally:
        run.finish()
    return artifact.name
