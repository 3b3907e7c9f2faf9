"""``committee-train``: run the training pipeline into a model store."""

from __future__ import annotations

import shlex
import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from .config import PipelineConfig, load_config

app = typer.Typer(add_completion=False, help=__doc__)

_ENV = "COMMITTEE_"


@app.command()
def main(
    store: Annotated[Path, typer.Option(envvar=f"{_ENV}STORE", help="model store folder to publish into")] = Path("model-store"),
    config: Annotated[Optional[Path], typer.Option(envvar=f"{_ENV}TRAIN_CONFIG", help="TOML file with any subset of the pipeline's settings", exists=True, dir_okay=False)] = None,
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
    threads: Annotated[Optional[int], typer.Option(envvar=f"{_ENV}THREADS", help="torch intra-op threads")] = None,
) -> None:
    """Train members, combine them into ensembles, evaluate on the test split, export to ONNX
    (parity-checked) and publish everything to STORE; print and save a results table."""
    from .pipeline import run_pipeline
    from .report import print_table, write_markdown
    from .tradeoffs import plot_tradeoffs

    cfg = apply_overrides(load_config(config), {
        "data.dataset": dataset, "data.data_dir": data_dir, "data.download": download,
        "data.train_limit": train_limit,
        "members.count": members, "members.arch": arch, "members.phi": phi, "members.train.epochs": epochs,
        "run_name": run_name, "threads": threads,
    })
    started = time.monotonic()
    published = run_pipeline(cfg, store)
    seconds = time.monotonic() - started
    print_table(published, f"{cfg.run_name}: test-set results ({seconds:.0f} s)")
    write_markdown(published, report_dir / "training-results.md", shlex.join(["committee-train", *sys.argv[1:]]), seconds)
    plot = plot_tradeoffs(published, report_dir / "tradeoffs.png", f"{cfg.run_name}: accuracy vs compute (test split)")
    print(f"wrote {report_dir / 'training-results.md'} and {plot}")


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
