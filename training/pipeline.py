"""The whole run: data -> members -> ensembles -> (evaluate, export, publish) -> results table."""

from __future__ import annotations

import subprocess
import tempfile
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch
from torch import nn

from model_store import Composition, InputSpec, Kind, Manifest, Metrics, ModelStore, Provenance

from .combine import Ensemble
from .config import PipelineConfig
from .data import Splits, channel_stats, load_dataset, make_splits
from .evaluate import classification_metrics, count_params, flops_per_image, predict_logits, softmax
from .export import IO, export_onnx
from .inputs import Images, as_images, input_spec
from .members import build_member, image_size_for
from .train import fit


@dataclass(frozen=True)
class SplitImages:
    train: Images
    val: Images
    test: Images


@dataclass
class RunContext:
    """What every step of one run shares: config, data at each resolution, the store, results."""

    config: PipelineConfig
    splits: Splits
    store: ModelStore
    mean: list[float]
    std: list[float]
    published: list[Manifest] = field(default_factory=list)
    _by_size: dict[int, SplitImages] = field(default_factory=dict)

    def images(self, size: int) -> SplitImages:
        if size not in self._by_size:
            s = self.splits
            self._by_size[size] = SplitImages(
                *(as_images(part.images, part.labels, size) for part in (s.train, s.val, s.test))
            )
        return self._by_size[size]

    def spec(self, size: int) -> InputSpec:
        return input_spec(self.splits.train.images.shape[1], size, self.mean, self.std)

    def provenance(self, seed: int | None, config: dict[str, Any]) -> Provenance:
        s = self.splits
        return Provenance(
            dataset=s.dataset, train_size=len(s.train), val_size=len(s.val), test_size=len(s.test),
            split_seed=s.split_seed, seed=seed, config=config, code_version=code_version(),
        )

    def publish(
        self,
        model: nn.Module,
        *,
        name: str,
        kind: Kind,
        spec: InputSpec,
        description: str,
        architecture: str | None,
        composition: Composition = Composition(),
        seed: int | None = None,
        config: dict[str, Any] | None = None,
    ) -> Manifest:
        """Evaluate on test, export to ONNX (with parity check) and publish atomically."""
        test = self.images(spec.height).test
        metrics = test_metrics(model, test, spec)
        with tempfile.TemporaryDirectory() as tmp:
            exported = export_onnx(model, spec, Path(tmp) / "model.onnx", test.x[: self.config.parity_samples])
            manifest = self.store.publish(
                {
                    "name": f"{self.config.run_name}-{name}",
                    "kind": kind,
                    "description": description,
                    "architecture": architecture,
                    "input": spec,
                    "labels": self.splits.classes,
                    "io": IO,
                    "export": exported.info,
                    "composition": composition,
                    "metrics": metrics,
                    "provenance": self.provenance(seed, config or {}),
                },
                exported.path,
            )
        self.published.append(manifest)
        print(f"published {manifest.ref} ({kind.value}): test accuracy {metrics.accuracy:.4f}")
        return manifest


def test_metrics(model: nn.Module, test: Images, spec: InputSpec) -> Metrics:
    probs = softmax(predict_logits(model, test.x, spec))
    return Metrics(
        samples=len(test),
        params=count_params(model),
        flops_per_image=flops_per_image(model, spec),
        **classification_metrics(probs, test.y.numpy()),
    )


def code_version() -> str:
    try:
        return subprocess.run(
            ["git", "describe", "--always", "--dirty"], capture_output=True, text=True, check=True,
            cwd=Path(__file__).parent, timeout=5,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        try:
            return version("committee")
        except PackageNotFoundError:
            return "unknown"


def prepare(config: PipelineConfig, store_dir: Path) -> RunContext:
    torch.set_num_threads(config.threads)
    d = config.data
    train, test = load_dataset(d.dataset, d.data_dir, d.download)
    splits = make_splits(d.dataset, train, test, d.val_fraction, d.split_seed, d.train_limit)
    mean, std = channel_stats(splits.train.images)
    print(f"data {d.dataset}: train {len(splits.train)}, val {len(splits.val)}, test {len(splits.test)} images, {len(splits.classes)} classes")
    return RunContext(config, splits, ModelStore(store_dir), mean, std)


def train_members(ctx: RunContext) -> tuple[list[nn.Module], list[Manifest], InputSpec]:
    mc = ctx.config.members
    size = image_size_for(mc.arch, mc.phi, ctx.splits.train.images.shape[-1])
    spec = ctx.spec(size)
    data = ctx.images(size)
    models, manifests = [], []
    for i in range(mc.count):
        seed = mc.first_seed + i
        model = build_member(mc.arch, len(ctx.splits.classes), spec.channels, mc.phi)
        result = fit(model, data.train, data.val, spec, mc.train, seed=seed, desc=f"member {i + 1}/{mc.count}")
        manifests.append(ctx.publish(
            model, name=f"member-{i}", kind=Kind.MEMBER, spec=spec, architecture=mc.arch, seed=seed,
            description=f"{mc.arch} phi={mc.phi} member {i} (seed {seed}); best epoch {result.best_epoch}",
            config={"phi": mc.phi, **mc.train.model_dump(), "history": result.history},
        ))
        models.append(model)
    return models, manifests, spec


def build_ensembles(ctx: RunContext, members: list[nn.Module], refs: list[Manifest], spec: InputSpec) -> list[Manifest]:
    arch = ctx.config.members.arch
    return [
        ctx.publish(
            Ensemble(members, rule), name=f"ensemble-{rule.value.replace('_', '-')}", kind=Kind.ENSEMBLE, spec=spec,
            architecture=arch, description=f"{len(members)} x {arch}, combined by {rule.value}",
            composition=Composition(members=[m.ref for m in refs], combine=rule),
        )
        for rule in ctx.config.ensembles.rules
    ]


def run_pipeline(config: PipelineConfig, store_dir: Path) -> list[Manifest]:
    ctx = prepare(config, store_dir)
    members, member_manifests, spec = train_members(ctx)
    if len(members) > 1:
        build_ensembles(ctx, members, member_manifests, spec)
    return ctx.published
