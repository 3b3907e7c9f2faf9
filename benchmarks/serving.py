"""Side-by-side serving benchmark: one run, one machine, every number next to its reference.

    python -m benchmarks.serving [--seconds 10] [--sections tiny,compute,settings,servers,triton,overload,variants]
                                 [--store model-store] [--triton-venv .venv-triton] [--markdown docs/benchmarks.md]

Sections (each model runs in its own process; torch never shares one with ONNX Runtime compute):
  tiny      resnet18 at 32 px: raw ONNX Runtime, a naive FastAPI server, committee-serve (JSON and
            binary tensors) and its p50 overhead over raw batch-1 latency at concurrency 1
  compute   efficientnet_b0 at 224 px, binary tensors: served vs raw ONNX Runtime at its best batch size
  settings  --instances, --thread-pool, --workers, --intra-op-threads on both models, side by side
  servers   uvicorn vs granian under the same app (each also with --workers 2): resnet18 JSON and
            binary, efficientnet_b0 binary; ratio to uvicorn's defaults
  triton    committee-serve vs NVIDIA Triton (PyTriton, the same ONNX file in ONNX Runtime, Triton's
            dynamic batcher) on both models, the same v2 bodies (JSON and binary); needs `make triton-venv`,
            else its rows say why they were skipped
  overload  capacity vs 10x the connections: successes per second and p99
  variants  every served variant of a trained store (member, ensembles, adaptive, cascade, student)
            at concurrency 1, 8 and 32, with its held-out accuracy from the manifest
The load generator is wrk (one image per request) on the same machine.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from .load import (Body, Load, binary_body, committee_serve, free_port, json_body, mean_batch, served_body, server, wrk,
                   write_between_markers)

SECTIONS = ("tiny", "compute", "settings", "servers", "triton", "overload", "variants")
ROOT = Path(__file__).resolve().parent.parent
VARIANT_SUFFIXES = ("member-0", "ensemble-mean-prob", "adaptive", "cascade", "student")
# Throughput sections measure saturation: admission control (which would refuse what queues past
# two batches' time) is opened up, so every configuration serves the same offered load.
SATURATE = ("--max-queue-wait-ms", "5000")
SETTINGS = (
    ("defaults", ()),
    ("--instances 2", ("--instances", "2")),
    ("--thread-pool shared", ("--thread-pool", "shared")),
    ("--intra-op-threads 1 --instances 2", ("--intra-op-threads", "1", "--instances", "2")),
    ("--workers 2", ("--workers", "2")),
    ("--workers 2 --intra-op-threads 1", ("--workers", "2", "--intra-op-threads", "1")),
)
SERVERS = (
    ("uvicorn (default)", ()),
    ("granian", ("--server", "granian")),
    ("uvicorn --workers 2", ("--workers", "2")),
    ("granian --workers 2", ("--server", "granian", "--workers", "2")),
)
# The bar for the Triton comparison: this many times Triton's answers/s, at a p99 no worse.
TRITON_TARGET = 1.2


@dataclass(frozen=True)
class Model:
    """A random-weight timm model published into its own store for the benchmark."""

    arch: str
    size: int
    store: Path

    @property
    def path(self) -> str:
        return f"/v2/models/{self.arch}/infer"

    def body(self, binary: bool = True) -> Body:
        x = np.random.default_rng(0).normal(size=(1, 3, self.size, self.size)).astype(np.float32)
        return binary_body(x, "input", "logits") if binary else json_body(x, "input")


@dataclass(frozen=True)
class Workload:
    """One load: a model, a body format and wrk's connections."""

    model: Model
    binary: bool
    connections: int

    @property
    def label(self) -> str:
        return f"{self.model.arch} {self.model.size} px, {'binary' if self.binary else 'JSON'}, c={self.connections}"


# A server under comparison: given a model, a context manager that serves it and yields the base URL.
Contender = Callable[[Model], AbstractContextManager[str]]


class Bench:
    def __init__(self, seconds: float, workdir: Path) -> None:
        self.seconds = seconds
        self.workdir = workdir
        self.py = sys.executable

    def publish(self, arch: str, size: int) -> Model:
        store = self.workdir / f"store-{arch}-{size}"
        subprocess.run([self.py, "-m", "benchmarks.make_model", "--store", str(store), "--arch", arch, "--size", str(size)], check=True)
        return Model(arch, size, store)

    def raw(self, model: Model, batches: str) -> dict:
        out = subprocess.run([self.py, "-m", "benchmarks.raw_ort", "--store", str(model.store), "--model", model.arch,
                              "--batches", batches, "--seconds", str(max(1.0, self.seconds / 4))],
                             capture_output=True, text=True, check=True).stdout
        raw = json.loads(out)
        raw["img_per_s"] = {int(k): v for k, v in raw["img_per_s"].items()}
        return raw

    def load(self, url: str, body: Body, connections: int) -> Load:
        wrk(url, body, connections, 2, self.workdir)  # warm-up: connections open, the batcher's estimate settles
        return wrk(url, body, connections, self.seconds, self.workdir)

    def serve(self, store: Path, *args: str):
        """committee-serve without background calibration, which would share the cores with the load."""
        port = free_port()
        return server(committee_serve(store, port, "--no-calibrate", *args), port)

    def triton(self, model: Model, venv: Path):
        """NVIDIA Triton serving ``model``'s ONNX file (benchmarks/triton_peer.py in its own venv),
        ready once the model itself is (Triton's server readiness says yes before any model loaded)."""
        from model_store import ModelStore

        python = venv / "bin" / "python"
        if not python.exists():
            raise RuntimeError(f"no Triton venv at {venv} (make triton-venv)")
        store = ModelStore(model.store)
        manifest = store.resolve(model.arch)
        port = free_port()
        return server([str(python), str(ROOT / "benchmarks" / "triton_peer.py"), "--onnx", str(store.verify(manifest)),
                       "--model", model.arch, "--input", manifest.io.input_name, "--output", manifest.io.output_name,
                       "--port", str(port)], port, f"/v2/models/{model.arch}/ready")


def row(*cells: object) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def load_cells(load: Load) -> tuple[str, str, str]:
    errors = f" ({load.errors} non-2xx)" if load.errors else ""
    return f"{load.ok_per_s:,.0f}{errors}", f"{load.p50_ms:.2f}", f"{load.p99_ms:.2f}"


def tiny(b: Bench, model: Model, c: int) -> list[str]:
    raw = b.raw(model, f"1,{c}")
    port = free_port()
    with server([b.py, "-m", "benchmarks.naive_server", str(model.store), model.arch, str(port)], port, "/docs") as url:
        naive = b.load(url + model.path, model.body(binary=False), c)
    with b.serve(model.store) as url:
        runs = {(binary, conns): b.load(url + model.path, model.body(binary), conns) for binary in (False, True) for conns in (1, c)}
        batch = mean_batch(url, model.arch)
    lines = [f"### Overhead-bound: timm {model.arch} at 3×{model.size}×{model.size}", "",
             "| setup | img/s | p50 ms | p99 ms | ratio |", "|---|---:|---:|---:|---|",
             row("raw ONNX Runtime, batch 1", f"{raw['img_per_s'][1]:,.0f}", f"{raw['batch1_ms_p50']:.2f}", "", "reference"),
             row(f"raw ONNX Runtime, batch {c}", f"{raw['img_per_s'][c]:,.0f}", "", "", "reference"),
             row(f"naive FastAPI + ORT, JSON, c={c}", *load_cells(naive), "1.00 × naive")]
    for (binary, conns), load in runs.items():
        ref, name = (raw["img_per_s"][1], "raw batch 1") if conns == 1 else (naive.ok_per_s, "naive")
        lines.append(row(f"committee-serve, {'binary' if binary else 'JSON'}, c={conns}", *load_cells(load),
                         f"{load.ok_per_s / ref:.2f} × {name}"))
    lines += ["",
              f"- p50 overhead over raw batch-1 latency at c=1: binary {runs[True, 1].p50_ms - raw['batch1_ms_p50']:.2f} ms, "
              f"JSON {runs[False, 1].p50_ms - raw['batch1_ms_p50']:.2f} ms (loopback HTTP and wrk included)",
              f"- committee-serve binary, c={c} / raw ONNX Runtime at batch {c}: {runs[True, c].ok_per_s / raw['img_per_s'][c]:.2f}",
              f"- mean executed batch size over the run: {batch:.1f}"]
    return lines


def compute(b: Bench, model: Model, c: int) -> list[str]:
    raw = b.raw(model, "1,2,4,8,16,32")
    best = raw["best_batch"]
    served = {}
    for label, args in (("max batch 32 (default)", ()), (f"--max-batch-size {best}", ("--max-batch-size", str(best)))):
        with b.serve(model.store, *SATURATE, *args) as url:
            served[label] = (b.load(url + model.path, model.body(), c), mean_batch(url, model.arch))
    sweep = ", ".join(f"{k}: {v:,.1f}" for k, v in raw["img_per_s"].items())
    lines = [f"### Compute-bound: timm {model.arch} at 3×{model.size}×{model.size}, binary tensors, c={c}", "",
             f"Raw ONNX Runtime img/s by batch size: {sweep}; best: batch {best}, {raw['best_img_per_s']:,.1f} img/s.", "",
             f"Served with `{' '.join(SATURATE)}` (measuring saturation, not admission control).", "",
             "| committee-serve | img/s | p50 ms | p99 ms | mean batch | served / raw best |", "|---|---:|---:|---:|---:|---:|"]
    for label, (load, batch) in served.items():
        lines.append(row(label, *load_cells(load), f"{batch:.1f}", f"{load.ok_per_s / raw['best_img_per_s']:.2f}"))
    return lines


def settings(b: Bench, models: list[tuple[Model, int]]) -> list[str]:
    header = " | ".join(f"{m.arch} c={c} img/s (p99 ms)" for m, c in models)
    lines = ["### Server settings, side by side", "", f"Each with `{' '.join(SATURATE)}`; binary tensors.", "",
             f"| committee-serve | {header} |", "|---|" + "---:|" * len(models)]
    for label, args in SETTINGS:
        cells = []
        for model, c in models:
            with b.serve(model.store, *SATURATE, *args) as url:
                load = b.load(url + model.path, model.body(), c)
            cells.append(f"{load.ok_per_s:,.0f} ({load.p99_ms:.0f})")
        lines.append(row(label, *cells))
    return lines


def one_line(exc: Exception) -> str:
    """An error as one table cell: its first line, and its last (where a child's stderr ends) when they differ."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()] or [type(exc).__name__]
    return (lines[0] if len(lines) == 1 else f"{lines[0]} … {lines[-1]}").replace("|", "/")


def side_by_side(b: Bench, contenders: dict[str, Contender], workloads: list[Workload]) -> dict[Workload, dict[str, Load | str]]:
    """Every contender under every workload: one server start per contender and model, the loads in
    turn. A contender that fails to start gets the reason (one line) instead of a Load, and the rest go on."""
    runs: dict[Workload, dict[str, Load | str]] = {w: {} for w in workloads}
    for model in dict.fromkeys(w.model for w in workloads):
        for name, start in contenders.items():
            try:
                with start(model) as url:
                    for w in (w for w in workloads if w.model == model):
                        runs[w][name] = b.load(url + model.path, model.body(w.binary), w.connections)
            except (RuntimeError, OSError) as exc:
                print(f"{name} on {model.arch}: {exc}", file=sys.stderr)
                for w in (w for w in workloads if w.model == model):
                    runs[w].setdefault(name, one_line(exc))
    return runs


def ratio_table(runs: dict[Workload, dict[str, Load | str]], reference: str, ratio: str) -> list[str]:
    """One row per workload and contender: answers/s, p50, p99 and answers/s over ``reference``'s."""
    lines = [f"| workload | server | answers/s | p50 ms | p99 ms | {ratio} |", "|---|---|---:|---:|---:|---:|"]
    for w, by_name in runs.items():
        ref = by_name.get(reference)
        for name, load in by_name.items():
            if isinstance(load, str):
                lines.append(row(w.label, name, f"skipped: {load}", "", "", ""))
                continue
            cell = ("reference" if name == reference else
                    f"{load.ok_per_s / ref.ok_per_s:.2f}" if isinstance(ref, Load) and ref.ok_per_s else "—")
            lines.append(row(w.label, name, *load_cells(load), cell))
    return lines


def servers(b: Bench, small: Model, big: Model) -> list[str]:
    contenders = {label: (lambda m, args=args: b.serve(m.store, *SATURATE, *args)) for label, args in SERVERS}
    workloads = [Workload(small, False, 32), Workload(small, True, 32), Workload(big, True, 16)]
    reference = SERVERS[0][0]
    return ["### ASGI servers: uvicorn vs granian, the same app", "",
            f"committee-serve `--server uvicorn|granian`, each with `{' '.join(SATURATE)}`; `--workers 2` runs two "
            "processes, each with its own models and batchers.", "",
            *ratio_table(side_by_side(b, contenders, workloads), reference, f"/ {reference}")]


def triton(b: Bench, small: Model, big: Model, venv: Path) -> list[str]:
    contenders: dict[str, Contender] = {"committee-serve": lambda m: b.serve(m.store, *SATURATE),
                                        "Triton (PyTriton)": lambda m: b.triton(m, venv)}
    workloads = [Workload(m, binary, c) for m, c in ((small, 32), (big, 16)) for binary in (False, True)]
    runs = side_by_side(b, contenders, workloads)
    lines = ["### NVIDIA Triton as a peer", "",
             "Triton 2.51 through PyTriton 0.7 (`make triton-venv`, benchmarks/triton_peer.py): the same ONNX file run by "
             "ONNX Runtime (same session options) inside a PyTriton `@batch` function, one instance behind Triton's dynamic "
             "batcher at committee-serve's defaults (max batch 32, no queue delay); the same v2 request bodies, JSON and "
             f"binary tensors. committee-serve with `{' '.join(SATURATE)}`.", "",
             *ratio_table(runs, "Triton (PyTriton)", "committee / Triton"), ""]
    for w, by_name in runs.items():
        ours, theirs = by_name.get("committee-serve"), by_name.get("Triton (PyTriton)")
        if isinstance(ours, Load) and isinstance(theirs, Load) and theirs.ok_per_s:
            met = ours.ok_per_s >= TRITON_TARGET * theirs.ok_per_s and ours.p99_ms <= theirs.p99_ms
            lines.append(f"- {w.label}: {ours.ok_per_s / theirs.ok_per_s:.2f}× Triton's answers/s, p99 {ours.p99_ms:.1f} vs "
                         f"{theirs.p99_ms:.1f} ms: target (≥ {TRITON_TARGET}× at a p99 no worse) {'met' if met else 'not met'}")
    return lines


def overload(b: Bench, model: Model, c: int) -> list[str]:
    with b.serve(model.store) as url:
        at_capacity = b.load(url + model.path, model.body(), c)
        over = b.load(url + model.path, model.body(), 10 * c)
    return [f"### Overload: {model.arch}, binary tensors, wrk", "",
            "| connections | successes/s | non-2xx | p50 ms | p99 ms (all responses) |", "|---:|---:|---:|---:|---:|",
            row(c, f"{at_capacity.ok_per_s:,.0f}", at_capacity.errors, f"{at_capacity.p50_ms:.2f}", f"{at_capacity.p99_ms:.2f}"),
            row(10 * c, f"{over.ok_per_s:,.0f}", over.errors, f"{over.p50_ms:.2f}", f"{over.p99_ms:.2f}"),
            "", f"- goodput at 10× the connections: {over.ok_per_s / at_capacity.ok_per_s:.0%} of capacity; "
            f"p99 {over.p99_ms / at_capacity.p99_ms:.1f}× (wrk's p99 mixes the prompt 503s in)"]


def variants(b: Bench, store: Path) -> list[str]:
    from model_store import ModelStore

    s = ModelStore(store)
    chosen = [n for suffix in VARIANT_SUFFIXES for n in s.names() if n == suffix or n.endswith("-" + suffix)]
    if not chosen:
        return [f"### Variants: no model in {store} named like {', '.join(VARIANT_SUFFIXES)}"]
    lines = [f"### Default pipeline variants ({store}), binary tensors, one image per request", "",
             "| variant | kind | held-out accuracy | c=1 img/s (p50/p99 ms) | c=8 | c=32 |", "|---|---|---:|---:|---:|---:|"]
    with b.serve(store, "--models", ",".join(chosen)) as url:
        for name in chosen:
            manifest = s.resolve(name)
            body = served_body(url, name)
            cells = []
            for c in (1, 8, 32):
                load = b.load(f"{url}/v2/models/{name}/infer", body, c)
                cells.append(f"{load.ok_per_s:,.0f} ({load.p50_ms:.1f}/{load.p99_ms:.1f})")
            metrics = manifest.metrics
            accuracy = "—" if metrics is None else f"{metrics.accuracy:.4f} ({metrics.split}, n={metrics.samples})"
            lines.append(row(name, manifest.kind.value, accuracy, *cells))
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10, help="duration of each measured load")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {', '.join(SECTIONS)}")
    parser.add_argument("--store", type=Path, default=Path("model-store"), help="the trained store for the variants section")
    parser.add_argument("--triton-venv", type=Path, default=ROOT / ".venv-triton",
                        help="the venv `make triton-venv` made, for the triton section")
    parser.add_argument("--markdown", type=Path, help="also write the tables into this Markdown file")
    args = parser.parse_args()
    chosen = [s.strip() for s in args.sections.split(",") if s.strip()]
    if unknown := set(chosen) - set(SECTIONS):
        sys.exit(f"unknown sections {sorted(unknown)}; choose from {', '.join(SECTIONS)}")
    if shutil.which("wrk") is None:
        sys.exit("wrk is not installed: apt-get install wrk (Debian), or run `make bench`, which installs it")
    lines: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        b = Bench(args.seconds, Path(tmp))
        small = b.publish("resnet18", 32) if {"tiny", "settings", "servers", "triton", "overload"} & set(chosen) else None
        big = b.publish("efficientnet_b0", 224) if {"compute", "settings", "servers", "triton"} & set(chosen) else None
        for section in chosen:
            if section == "tiny":
                part = tiny(b, small, 32)
            elif section == "compute":
                part = compute(b, big, 16)
            elif section == "settings":
                part = settings(b, [(small, 32), (big, 16)])
            elif section == "servers":
                part = servers(b, small, big)
            elif section == "triton":
                part = triton(b, small, big, args.triton_venv)
            elif section == "overload":
                part = overload(b, small, 32)
            elif not (args.store / ".").is_dir():
                part = [f"### Variants: {args.store} does not exist (train first: `make train`)"]
            else:
                part = variants(b, args.store)
            print("\n".join(part) + "\n", flush=True)
            lines += [*part, ""]
    if args.markdown:
        command = "python -m benchmarks.serving " + " ".join(sys.argv[1:])
        write_between_markers(args.markdown, "benchmarks.serving", "\n".join([
            f"Random-weight timm models unless a trained store is named; one image per request; load from wrk on "
            f"the same machine ({os.cpu_count()} cores, no GPU). Command: `{command}` (or `make bench`).", "", *lines]))


if __name__ == "__main__":
    main()
