"""``committee-train``: run the training pipeline into a model store."""

from __future__ import annotations

import enum
import json
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Annotated, Optional

import typer

from .config import PRESETS, PipelineConfig, load_config

app = typer.Typer(add_completion=False, help=__doc__)

Preset = enum.Enum("Preset", {name: name for name in PRESETS}, type=str)

_ENV = "COMMITTEE_"


@app.callback(invoke_without_command=True)
def main(
    ctx: typer.Context,
    store: Annotated[Path, typer.Option(envvar=f"{_ENV}STORE", help="model store folder to publish into")] = Path("model-store"),
    preset: Annotated[Preset, typer.Option(envvar=f"{_ENV}PRESET", help="quick: the whole pipeline in about 5 min on 2 CPU cores; full: the full training split, long schedules")] = Preset.quick,
    config: Annotated[Optional[Path], typer.Option(envvar=f"{_ENV}TRAIN_CONFIG", help="TOML file with any subset of the pipeline's settings, over the preset", exists=True, dir_okay=False)] = None,
    report_dir: Annotated[Path, typer.Option(envvar=f"{_ENV}REPORT_DIR", help="where training-results.md and tradeoffs.png are written")] = Path("reports"),
    dataset: Annotated[Optional[str], typer.Option(help="fashion_mnist, mnist, digits, cifar10, cifar100, image_folder")] = None,
    data_dir: Annotated[Optional[Path], typer.Option(envvar=f"{_ENV}DATA_DIR", help="folder with the data set's files")] = None,
    download: Annotated[Optional[bool], typer.Option("--download/--no-download", help="allow torchvision to download CIFAR")] = None,
    train_limit: Annotated[Optional[int], typer.Option(help="class-stratified training subset size; 0 = the full training split")] = None,
    members: Annotated[Optional[int], typer.Option(help="members per ensemble")] = None,
    arch: Annotated[Optional[str], typer.Option(help="member architecture: committee_cnet or a timm name")] = None,
    phi: Annotated[Optional[float], typer.Option(help="compound-scaling coefficient for committee_cnet")] = None,
    epochs: Annotated[Optional[int], typer.Option(help="maximum epochs per member")] = None,
    run_name: Annotated[Optional[str], typer.Option(help="prefix of the published model names")] = None,
    seed: Annotated[Optional[int], typer.Option(help="run seed: shifts every model's seed (repeat a run to see its noise)")] = None,
    threads: Annotated[Optional[int], typer.Option(envvar=f"{_ENV}THREADS", help="torch intra-op threads")] = None,
    device: Annotated[Optional[str], typer.Option(envvar=f"{_ENV}TRAIN_DEVICE", help="auto, cpu or cuda (falls back to the CPU with a log line)")] = None,
    parallel: Annotated[int, typer.Option(min=1, help="train this many members at once, each in its own process with cores/N threads")] = 1,
) -> None:
    """Train members, combine them into ensembles, evaluate on the test split, export to ONNX
    (parity-checked) and publish everything to STORE; print and save a results table.

    Subcommands split the run for a cluster: `member --index I` trains one member (one pod of an
    Indexed Job), `combine` builds everything else from the published members."""
    cfg = apply_overrides(load_config(config, preset.value), {
        "data.dataset": dataset, "data.data_dir": data_dir, "data.download": download,
        "data.train_limit": train_limit,
        "members.count": members, "members.arch": arch, "members.phi": phi, "members.train.epochs": epochs,
        "run_name": run_name, "threads": threads, "seed": seed, "device": device,
    })
    ctx.obj = (cfg, store, report_dir)
    if ctx.invoked_subcommand is not None:
        return
    from .pipeline import combine as combine_all, load_members, prepare, train_members

    started = time.monotonic()
    if parallel > 1:
        run_members_in_parallel(cfg.members.count, parallel, cfg.threads)
        context = prepare(cfg, store)
        combine_all(context, load_members(context))
    else:
        context = prepare(cfg, store)
        combine_all(context, train_members(context))
    report(context, report_dir, time.monotonic() - started)


@app.command()
def member(
    ctx: typer.Context,
    index: Annotated[int, typer.Option(envvar="JOB_COMPLETION_INDEX", help="which member (default: the Indexed Job's completion index)")],
) -> None:
    """Train and publish member INDEX alone, with a checkpoint for `combine`."""
    from .pipeline import prepare, train_member

    cfg, store, _ = ctx.obj
    train_member(prepare(cfg, store), index)


@app.command()
def combine(ctx: typer.Context) -> None:
    """Build the ensembles, adaptive ensemble, cascade and students from the published members."""
    from .pipeline import combine as combine_all, load_members, prepare

    cfg, store, report_dir = ctx.obj
    started = time.monotonic()
    context = prepare(cfg, store)
    combine_all(context, load_members(context))
    report(context, report_dir, time.monotonic() - started)


@app.command()
def spread(
    report_dirs: Annotated[list[Path], typer.Argument(help="report folders of repeated runs (each has claims.json)", exists=True, file_okay=False)],
) -> None:
    """Print the headline numbers of repeated runs side by side with their mean and spread."""
    from .spread import spread_table

    print(spread_table(report_dirs))


def run_members_in_parallel(count: int, parallel: int, threads: int) -> None:
    """``committee-train ... member --index i`` for every member, ``parallel`` processes at a time,
    the cores split between them (torch in one process per member: no shared pool to fight over)."""
    per_process = max(1, threads // parallel)
    base = [a for a in _without_option(sys.argv[1:], "--parallel")]
    command = [sys.executable, "-m", "training.cli", *base, "--threads", str(per_process)]

    def one(index: int) -> None:
        subprocess.run([*command, "member", "--index", str(index)], check=True)

    print(f"training {count} members, {parallel} at a time, {per_process} thread(s) each")
    with ThreadPoolExecutor(parallel) as pool:
        list(pool.map(one, range(count)))


def _without_option(args: list[str], name: str) -> list[str]:
    out, skip = [], False
    for arg in args:
        if skip:
            skip = False
        elif arg == name:
            skip = True
        elif not arg.startswith(name + "="):
            out.append(arg)
    return out


def report(context, report_dir: Path, seconds: float) -> None:
    """The results and claims tables (printed and as Markdown), ``claims.json`` (strict JSON: an
    undefined value is null, with its reason in the row's ``notes``), ``test_predictions.npz`` (the
    test labels and every model's predicted class, by model name) and the trade-off plot."""
    from .claims import claims, strict_json_value
    from .report import print_table, write_markdown
    from .tradeoffs import plot_tradeoffs

    published, run_name = context.published, context.config.run_name
    found = claims(published, run_name, context.test_predictions, context.splits.test.labels)
    print_table(published, f"{run_name}: test-set results ({seconds:.0f} s)", found)
    write_markdown(published, report_dir / "training-results.md", shlex.join(["committee-train", *sys.argv[1:]]), seconds, found)
    body = {"seconds": seconds, "preset": context.config.preset, "seed": context.config.seed,
            "claims": [c.as_dict() for c in found]}
    (report_dir / "claims.json").write_text(json.dumps(strict_json_value(body), indent=1, allow_nan=False))
    # every model's predicted class per test image, so the paired tests can be redone (or pooled) later
    import numpy as np

    np.savez_compressed(report_dir / "test_predictions.npz", labels=context.splits.test.labels,
                        **{name: p.astype(np.int16) for name, p in context.test_predictions.items()})
    plot = plot_tradeoffs(published, report_dir / "tradeoffs.png", f"{run_name}: accuracy vs compute (test split)")
    print(f"wrote {report_dir / 'training-results.md'}, claims.json, test_predictions.npz and {plot}")


def apply_overrides(config: PipelineConfig, overrides: dict[str, object]) -> PipelineConfig:
    """Set dotted fields whose value was given (None means 'not given'); the result is re-validated."""
    data = config.model_dump()
    for dotted, value in overrides.items():
        if value is None:
            continue
        *parents, leaf = dotted.split(".")
        node = data
        for key in parents:
            node = node[key]
        node[leaf] = value
    return PipelineConfig.model_validate(data)


if __name__ == "__main__":
    app()
