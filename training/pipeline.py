"""The whole run: data -> members -> ensembles, adaptive ensemble, cascade, students -> (evaluate,
export, publish) each. Every metric in a manifest is measured on the test split; every choice
(early stopping, head seed, cascade thresholds) is made on validation."""

from __future__ import annotations

import functools
import subprocess
import tempfile
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from model_store import CascadeStage, CombineRule, Composition, InputSpec, Kind, Manifest, Metrics, ModelStore, Provenance

from .adaptive import fit_head_on_features
from .cascade import operating_points, simulate
from .combine import AdaptiveEnsemble, Ensemble, PooledFeatures, combine_logits
from .config import PipelineConfig
from .data import Splits, adaptive_partition, channel_stats, load_dataset, make_splits
from .device import resolve_device
from .distill import teacher_loss
from .evaluate import classification_metrics, count_params, flops_per_image, forward_batched, predict_logits, softmax
from .export import export_onnx
from .inputs import Images, as_images, input_spec
from .members import build_member, image_size_for
from .train import LossFn, TrainConfig, cross_entropy, fit


CHECKPOINTS = ".checkpoints"
# Every model seed of a run is its configured seed + SEED_STRIDE x the run's seed (configured seeds stay below it).
SEED_STRIDE = 1000


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
    device: torch.device = torch.device("cpu")
    published: list[Manifest] = field(default_factory=list)
    # every published model's predicted class per test image, by full name: the claims' paired tests
    test_predictions: dict[str, np.ndarray] = field(default_factory=dict)
    _by_size: dict[int, SplitImages] = field(default_factory=dict)
    _logits: dict[tuple[int, str, int], tuple[nn.Module, np.ndarray]] = field(default_factory=dict)
    _features: dict[tuple[int, str, int], tuple[nn.Module, np.ndarray]] = field(default_factory=dict)
    # models whose logits come from their cached pooled features (the adaptive ensemble's learners:
    # their features feed the head, so one pass per split gives both)
    _via_features: set[int] = field(default_factory=set)

    def images(self, size: int) -> SplitImages:
        if size not in self._by_size:
            s = self.splits
            self._by_size[size] = SplitImages(
                *(as_images(part.images, part.labels, size) for part in (s.train, s.val, s.test))
            )
        return self._by_size[size]

    def logits(self, model: nn.Module, split: str, spec: InputSpec) -> np.ndarray:
        """A model's logits on one split, computed once per run: an ensemble's come from its
        members' (already computed for their own evaluation), not from running them again; an
        adaptive ensemble's and its learners' from the learners' cached pooled features."""
        key = (id(model), split, spec.height)
        if key not in self._logits:
            if isinstance(model, Ensemble):
                stacked = torch.stack([torch.from_numpy(self.logits(m, split, spec)) for m in model.members])
                out = combine_logits(stacked, model.rule).numpy()
            elif isinstance(model, AdaptiveEnsemble):
                pooled = np.concatenate([self.features(m, split, spec) for m in model.features.members], axis=1)
                out = _apply(model.head, pooled)
            elif id(model) in self._via_features:
                out = _apply(model.get_classifier(), self.features(model, split, spec))
            else:
                out = predict_logits(model, getattr(self.images(spec.height), split).x, spec)
            self._logits[key] = (model, out)  # the model is kept so that its id is not reused
        return self._logits[key][1]

    def features(self, model: nn.Module, split: str, spec: InputSpec) -> np.ndarray:
        """One model's pooled features (timm ``pre_logits``) on one split, computed once per run."""
        key = (id(model), split, spec.height)
        if key not in self._features:
            out = forward_batched(PooledFeatures([model]), getattr(self.images(spec.height), split).x, spec, 1024).numpy()
            self._features[key] = (model, out)
        return self._features[key][1]

    def keep(self, model: nn.Module, split: str, spec: InputSpec, logits: np.ndarray | None) -> None:
        """Remember logits computed elsewhere (a fit's last validation pass) for this exact model."""
        if logits is not None:
            self._logits[(id(model), split, spec.height)] = (model, logits)

    def spec(self, size: int) -> InputSpec:
        return input_spec(self.splits.train.images.shape[1], size, self.mean, self.std)

    def provenance(self, seed: int | None, config: dict[str, Any]) -> Provenance:
        s, c = self.splits, self.config
        return Provenance(
            dataset=s.dataset, train_size=len(s.train), val_size=len(s.val), test_size=len(s.test),
            split_seed=s.split_seed, seed=seed, config=config, code_version=code_version(),
            preset=c.preset, val_fraction=c.data.val_fraction, train_limit=c.data.train_limit, threads=c.threads,
            libraries=library_versions(),
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
        probs = softmax(self.logits(model, "test", spec))
        metrics = measure(model, probs, test, spec)
        with tempfile.TemporaryDirectory() as tmp:
            exported = export_onnx(model, spec, Path(tmp) / "model.onnx", test.x[: self.config.parity_samples])
            return self.record(
                {
                    "name": name, "kind": kind, "description": description, "architecture": architecture,
                    "input": spec, "io": exported.io, "export": exported.info, "composition": composition, "metrics": metrics,
                    "provenance": self.provenance(seed, config or {}),
                },
                probs.argmax(-1),
                exported.path,
            )

    def record(self, fields: dict[str, Any], test_predictions: np.ndarray, onnx_file: Path | None = None) -> Manifest:
        """Publish one version (``fields["name"]`` gets the run's prefix) and remember it, with its
        predicted class per test image (whose accuracy the manifest states)."""
        fields = {**fields, "name": f"{self.config.run_name}-{fields['name']}", "labels": self.splits.classes}
        manifest = self.store.publish(fields, onnx_file)
        self.published.append(manifest)
        self.test_predictions[manifest.name] = np.asarray(test_predictions)
        assert manifest.metrics is not None
        print(f"published {manifest.ref} ({manifest.kind.value}): test accuracy {manifest.metrics.accuracy:.4f}")
        return manifest


@torch.inference_mode()
def _apply(layer: nn.Module, features: np.ndarray) -> np.ndarray:
    layer.eval()
    return layer(torch.from_numpy(features).to(next(layer.parameters()).device)).float().cpu().numpy()


def measure(model: nn.Module, probs: np.ndarray, test: Images, spec: InputSpec) -> Metrics:
    return Metrics(
        samples=len(test),
        params=count_params(model),
        flops_per_image=flops_per_image(model, spec),
        **classification_metrics(probs, test.y.numpy()),
    )


@functools.cache
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


LIBRARIES = ("torch", "torchvision", "timm", "numpy", "onnx", "scikit-learn")


@functools.cache
def library_versions() -> dict[str, str]:
    """Versions of the libraries whose numerics shape a model (installed distributions only)."""
    found = {}
    for name in LIBRARIES:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            continue
    return found


def prepare(config: PipelineConfig, store_dir: Path) -> RunContext:
    torch.set_num_threads(config.threads)
    d = config.data
    train, test = load_dataset(d.dataset, d.data_dir, d.download)
    splits = make_splits(d.dataset, train, test, d.val_fraction, d.split_seed, d.train_limit)
    mean, std = channel_stats(splits.train.images)
    print(f"data {d.dataset}: train {len(splits.train)}, val {len(splits.val)}, test {len(splits.test)} images, {len(splits.classes)} classes")
    device = resolve_device(config.device)
    print(f"training on {device}")
    return RunContext(config, splits, ModelStore(store_dir), mean, std, device)


@dataclass(frozen=True)
class Trained:
    """A model still in memory beside the manifest it was published under."""

    model: nn.Module
    manifest: Manifest
    spec: InputSpec


def train_and_publish(
    ctx: RunContext, *, name: str, kind: Kind, arch: str, phi: float, train: TrainConfig, seed: int,
    description: str, subset: np.ndarray | None = None, loss_fn: LossFn = cross_entropy,
    composition: Composition = Composition(), train_size: int | None = None, via_features: bool = False,
) -> Trained:
    """``train_size``: the resolution of the training images when it is not the model's own (they
    are resized batch by batch; consistent distillation uses the teacher's). ``via_features``: the
    model's logits are derived from its cached pooled features (which a head will reuse)."""
    size = image_size_for(arch, phi, ctx.splits.train.images.shape[-1])
    spec = ctx.spec(size)
    data = ctx.images(size)
    train_images = ctx.images(train_size or size).train
    train_images = train_images if subset is None else train_images.subset(subset)
    seed += SEED_STRIDE * ctx.config.seed
    torch.manual_seed(seed)
    model = build_member(arch, len(ctx.splits.classes), spec.channels, phi).to(ctx.device)
    result = fit(model, train_images, data.val, spec, train, seed=seed, loss_fn=loss_fn, desc=name)
    ctx.keep(model, "val", spec, result.val_logits)
    if via_features:
        ctx._via_features.add(id(model))
    manifest = ctx.publish(
        model, name=name, kind=kind, spec=spec, architecture=arch, seed=seed, composition=composition,
        description=f"{description}; {arch} phi={phi}, seed {seed}, {len(train_images)} training images, best epoch {result.best_epoch}",
        config={"phi": phi, **train.model_dump(), "history": result.history},
    )
    return Trained(model, manifest, spec)


def train_member(ctx: RunContext, index: int) -> Trained:
    """Member ``index`` alone (what one pod of the Indexed Job runs), published with a torch
    checkpoint beside the store so that ``combine`` can build on it in another process."""
    mc = ctx.config.members
    if not 0 <= index < mc.count:
        raise ValueError(f"member index {index} is outside 0..{mc.count - 1} (members.count = {mc.count})")
    trained = train_and_publish(
        ctx, name=f"member-{index}", kind=Kind.MEMBER, arch=mc.arch, phi=mc.phi, train=mc.train,
        seed=mc.first_seed + index, description=f"ensemble member {index + 1} of {mc.count}",
    )
    path = checkpoint_path(ctx.store, trained.manifest)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")  # renamed into place: a reader never sees half a file
    torch.save(trained.model.state_dict(), partial)
    partial.replace(path)
    return trained


def checkpoint_path(store: ModelStore, manifest: Manifest) -> Path:
    """``<store>/.checkpoints/<name>/<version>.pt``: hidden from the store's names (they start with a
    letter or digit), so the server never sees it, but on the same volume as the store."""
    return store.root / CHECKPOINTS / manifest.name / f"{manifest.version}.pt"


def load_members(ctx: RunContext) -> list[Trained]:
    """The latest published version of every member, with its weights, for ``combine``."""
    mc = ctx.config.members
    members = []
    for index in range(mc.count):
        name = f"{ctx.config.run_name}-member-{index}"
        manifest = ctx.store.resolve(name)
        path = checkpoint_path(ctx.store, manifest)
        if not path.exists():
            raise FileNotFoundError(f"{manifest.ref} has no checkpoint at {path}: train it with `committee-train member --index {index}`")
        model = build_member(mc.arch, len(ctx.splits.classes), manifest.input.channels, mc.phi).to(ctx.device)
        model.load_state_dict(torch.load(path, weights_only=True, map_location=ctx.device))
        members.append(Trained(model.eval(), manifest, manifest.input))
        ctx.published.append(manifest)
        # the claims pair every model's test predictions; these come from the same logits the
        # ensembles and the cascade reuse (one pass per member)
        ctx.test_predictions[manifest.name] = ctx.logits(model, "test", manifest.input).argmax(-1)
    return members


def train_members(ctx: RunContext) -> list[Trained]:
    return [train_member(ctx, i) for i in range(ctx.config.members.count)]


def build_ensembles(ctx: RunContext, members: list[Trained]) -> dict[CombineRule, Trained]:
    arch = ctx.config.members.arch
    spec = members[0].spec
    built = {}
    for rule in ctx.config.ensembles.rules:
        model = Ensemble([m.model for m in members], rule)
        manifest = ctx.publish(
            model, name=f"ensemble-{rule.value.replace('_', '-')}", kind=Kind.ENSEMBLE, spec=spec,
            architecture=arch, description=f"{len(members)} x {arch}, combined by {rule.value}",
            composition=Composition(members=[m.manifest.ref for m in members], combine=rule),
        )
        built[rule] = Trained(model, manifest, spec)
    return built


def build_adaptive(ctx: RunContext) -> Trained:
    """Weak learners on disjoint subsets, the learned head over their features, and the plain mean of
    the same learners (``weak-mean``): the ablation that shows what the head itself adds."""
    ac = ctx.config.adaptive
    subsets, head_part = adaptive_partition(
        ctx.splits.train.labels, ac.learners, ac.head_fraction if ac.head_data == "held_out" else None, ctx.splits.split_seed
    )
    learners = [
        train_and_publish(
            ctx, name=f"weak-{i}", kind=Kind.MEMBER, arch=ac.arch, phi=ac.phi, train=ac.train, seed=ac.first_seed + i,
            subset=subset, description=f"adaptive-ensemble weak learner {i + 1} of {ac.learners} (own disjoint subset, overfit)",
            via_features=True,
        )
        for i, subset in enumerate(subsets)
    ]
    spec = learners[0].spec
    data = ctx.images(spec.height)
    refs = [w.manifest.ref for w in learners]
    ctx.publish(
        Ensemble([w.model for w in learners], CombineRule.MEAN_PROB), name="weak-mean", kind=Kind.ENSEMBLE, spec=spec,
        architecture=ac.arch, description=f"mean of the adaptive ensemble's {ac.learners} weak learners (no learned head)",
        composition=Composition(members=refs, combine=CombineRule.MEAN_PROB),
    )
    features = PooledFeatures([w.model for w in learners])
    head_train = data.train.subset(head_part)

    def pooled(split: str) -> torch.Tensor:  # every learner's features, computed once per split and reused
        return torch.from_numpy(np.concatenate([ctx.features(w.model, split, spec) for w in learners], axis=1))

    best = fit_head_on_features(pooled("train")[head_part], head_train.y, pooled("val"), data.val.y, len(ctx.splits.classes),
                                ac.head, ac.first_seed + SEED_STRIDE * ctx.config.seed)
    model = AdaptiveEnsemble(features, best.head.to(ctx.device))
    manifest = ctx.publish(
        model, name="adaptive", kind=Kind.ADAPTIVE_ENSEMBLE, spec=spec, architecture=ac.arch, seed=best.seed,
        description=f"linear head over {ac.learners} frozen weak learners' pooled features (head seed {best.seed}, "
                    f"head trained on {'held-out images no learner saw' if ac.head_data == 'held_out' else 'the learners own images'})",
        composition=Composition(members=refs),
        config={**ac.head.model_dump(), "head_data": ac.head_data, "head_images": len(head_train),
                "val_weighted_f1": best.val_weighted_f1, "head_epochs": best.epochs_run},
    )
    return Trained(model, manifest, spec)


def build_cascade(ctx: RunContext, members: list[Trained]) -> Manifest:
    cc = ctx.config.cascade
    spec = members[0].spec
    data = ctx.images(spec.height)
    probs = {split: np.stack([softmax(ctx.logits(m.model, split, spec)) for m in members]) for split in ("val", "test")}
    flops = [m.manifest.metrics.flops_per_image for m in members]  # type: ignore[union-attr]
    points = operating_points(probs["val"], data.val.y.numpy(), probs["test"], data.test.y.numpy(), flops, cc.confidence,
                              cc.tolerance, cc.operating_tolerances, cc.margin_z)
    thresholds = points[0].thresholds  # the served default, written as the manifest holds them (simulate reads them alike)
    on_test = simulate(probs["test"], flops, thresholds, cc.confidence)
    exits = on_test.exit_fractions(len(members))
    metrics = Metrics(
        samples=len(data.test), params=sum(m.manifest.metrics.params for m in members),  # type: ignore[union-attr]
        flops_per_image=float(on_test.flops.mean()), members_per_image=on_test.members_per_image(),
        **classification_metrics(on_test.probs, data.test.y.numpy()),
        extra={
            "val_accuracy": points[0].val_accuracy,
            "val_full_ensemble_accuracy": float((probs["val"].mean(0).argmax(-1) == data.val.y.numpy()).mean()),
            "flops_fraction_of_full_ensemble": float(on_test.flops.mean() / sum(flops)),
            **{f"test_exit_fraction_stage_{k + 1}": f for k, f in enumerate(exits)},
        },
    )
    stages = [
        CascadeStage(model=m.manifest.ref, threshold=thresholds[k] if k < len(thresholds) else None, flops_per_image=flops[k])
        for k, m in enumerate(members)
    ]
    return ctx.record({
        "name": "cascade", "kind": Kind.CASCADE, "input": spec, "architecture": ctx.config.members.arch, "metrics": metrics,
        "description": f"{len(members)}-stage {cc.confidence.value} cascade over the members, thresholds fit on validation "
                       f"(tolerance {cc.tolerance:.3f}, margin z={cc.margin_z}); {len(points)} operating points down to "
                       f"{points[-1].members_per_image:.2f} members per image on validation",
        "composition": Composition(stages=stages, combine=CombineRule.MEAN_PROB, confidence=cc.confidence, operating_points=points),
        "provenance": ctx.provenance(None, cc.model_dump(mode="json")),
    }, on_test.probs.argmax(-1))


def build_students(ctx: RunContext, teacher: Trained) -> list[Manifest]:
    sc = ctx.config.student
    teacher_images = ctx.images(teacher.spec.height).train.x
    # The adaptive ensemble's outputs on the training images are free (its learners' features were
    # computed for its head); an ensemble's are computed batch by batch as the student needs them.
    cached = None
    if not sc.consistent and isinstance(teacher.model, AdaptiveEnsemble):
        cached = torch.from_numpy(ctx.logits(teacher.model, "train", teacher.spec))
    distilled = train_and_publish(
        ctx, name="student", kind=Kind.STUDENT, arch=sc.arch, phi=sc.phi, train=sc.train, seed=sc.seed,
        loss_fn=teacher_loss(teacher.model, teacher_images, teacher.spec, sc.temperature, sc.alpha, sc.consistent, cached),
        composition=Composition(teacher=teacher.manifest.ref),
        train_size=teacher.spec.height if sc.consistent else None,
        description=f"distilled from {teacher.manifest.ref} (T={sc.temperature}, alpha={sc.alpha}, "
                    f"{'consistent' if sc.consistent else 'fixed'} teaching; a mean-prob ensemble teaches the mean of its "
                    "members' softened outputs)",
    )
    published = [distilled.manifest]
    if sc.undistilled_twin:
        published.append(train_and_publish(
            ctx, name="student-undistilled", kind=Kind.STUDENT, arch=sc.arch, phi=sc.phi, train=sc.train, seed=sc.seed,
            description="the student's architecture and budget on hard labels only (no teacher)",
        ).manifest)
    return published


def run_pipeline(config: PipelineConfig, store_dir: Path) -> RunContext:
    """The whole run; the context holds what was published (``published``) and each model's test
    predictions (``test_predictions``, for the claims' paired tests)."""
    ctx = prepare(config, store_dir)
    combine(ctx, train_members(ctx))
    return ctx


def combine(ctx: RunContext, members: list[Trained]) -> list[Manifest]:
    """Everything after the members: ensembles, baseline, adaptive ensemble, cascade, students."""
    config = ctx.config
    ensembles = build_ensembles(ctx, members) if len(members) > 1 else {}
    if config.baseline.enabled:
        b = config.baseline
        train_and_publish(ctx, name="single-large", kind=Kind.MEMBER, arch=b.arch, phi=b.phi, train=b.train or config.members.train, seed=b.seed,
                          description="one compound-scaled model at about the ensemble's FLOPs, the members' budget")
    adaptive = build_adaptive(ctx) if config.adaptive.enabled else None
    if config.cascade.enabled and len(members) > 1:
        build_cascade(ctx, members)
    if config.student.enabled:
        teacher = adaptive if config.student.teacher == "adaptive" else ensembles.get(CombineRule.MEAN_PROB)
        if teacher is None:
            raise ValueError(f"student teacher {config.student.teacher!r} was not built (enable it, or members.count >= 2 with mean_prob)")
        build_students(ctx, teacher)
    return ctx.published
