import json
import multiprocessing
from pathlib import Path

import pytest
from pydantic import ValidationError

from model_store import IntegrityError, Manifest, ModelNotFound, ModelStore, StoreError
from tests.helpers import member_fields


def _artifact(tmp_path: Path, content: bytes = b"onnx bytes") -> Path:
    path = tmp_path / "src.onnx"
    path.write_bytes(content)
    return path


def test_publish_assigns_increasing_versions_and_records_digest(tmp_path):
    store = ModelStore(tmp_path / "store")
    first = store.publish(member_fields(), _artifact(tmp_path))
    second = store.publish(member_fields(), _artifact(tmp_path, b"other"))
    assert (first.version, second.version) == (1, 2)
    assert store.versions("m") == [1, 2]
    assert store.resolve("m").version == 2
    assert store.resolve("m", 1).artifact.size == len(b"onnx bytes")
    assert store.verify(first) == tmp_path / "store" / "m" / "1" / "model.onnx"


def test_folders_being_published_or_without_manifest_are_invisible(tmp_path):
    store = ModelStore(tmp_path)
    store.publish(member_fields(), _artifact(tmp_path))
    (tmp_path / "m" / ".publishing-abc").mkdir()
    (tmp_path / "m" / ".publishing-abc" / "manifest.json").write_text("{}")
    (tmp_path / "m" / "7").mkdir()  # a version folder a crashed writer left without its manifest
    assert store.versions("m") == [1]
    assert store.names() == ["m"]
    assert store.resolve("m").version == 1


def test_failed_publish_leaves_nothing_behind(tmp_path):
    store = ModelStore(tmp_path)
    with pytest.raises(ValidationError):
        store.publish(member_fields(labels=["only-one"]), _artifact(tmp_path))
    assert store.versions("m") == []
    assert list((tmp_path / "m").iterdir()) == []


def test_tampered_artifact_is_refused_with_digests_in_message(tmp_path):
    store = ModelStore(tmp_path / "s")
    manifest = store.publish(member_fields(), _artifact(tmp_path))
    store.artifact_path(manifest).write_bytes(b"onnx bytez")  # same size, other content
    with pytest.raises(IntegrityError, match="sha256 .* manifest says"):
        store.verify(manifest)
    store.artifact_path(manifest).write_bytes(b"short")
    with pytest.raises(IntegrityError, match="has 5 bytes, manifest says 10"):
        store.verify(manifest)
    store.artifact_path(manifest).unlink()
    with pytest.raises(IntegrityError, match="missing"):
        store.verify(manifest)


def test_unknown_name_or_version_says_what_exists(tmp_path):
    store = ModelStore(tmp_path)
    store.publish(member_fields(), _artifact(tmp_path))
    with pytest.raises(ModelNotFound, match="no model named 'x'"):
        store.resolve("x")
    with pytest.raises(ModelNotFound, match=r"no version 3 \(available: \[1\]\)"):
        store.resolve("m", 3)


def test_corrupt_manifest_is_a_store_error(tmp_path):
    store = ModelStore(tmp_path)
    manifest = store.publish(member_fields(), _artifact(tmp_path))
    path = store.version_dir(manifest.ref) / "manifest.json"
    data = json.loads(path.read_text())
    data["kind"] = "wizard"
    path.write_text(json.dumps(data))
    with pytest.raises(StoreError, match="not a valid manifest"):
        store.resolve("m")


def _publish_many(args):
    root, count = args
    store = ModelStore(root)
    src = Path(root).parent / f"src-{multiprocessing.current_process().pid}.onnx"
    src.write_bytes(b"x" * 100)
    return [store.publish(member_fields(), src).version for _ in range(count)]


def test_concurrent_publishers_get_distinct_versions(tmp_path):
    root = tmp_path / "store"
    with multiprocessing.get_context("spawn").Pool(4) as pool:
        results = pool.map(_publish_many, [(str(root), 10)] * 4)
    versions = [v for chunk in results for v in chunk]
    assert sorted(versions) == list(range(1, 41))
    assert ModelStore(root).versions("m") == list(range(1, 41))
    assert not [p for p in (root / "m").iterdir() if p.name.startswith(".")]


def test_manifest_shape_must_match_kind():
    with pytest.raises(ValidationError, match="needs an ONNX artifact"):
        Manifest.model_validate({**member_fields(), "version": 1})
    with pytest.raises(ValidationError, match="at least one stage"):
        Manifest.model_validate({**member_fields(kind="cascade", io=None), "version": 1})
    with pytest.raises(ValidationError, match="one per channel"):
        Manifest.model_validate({
            **member_fields(kind="cascade"), "version": 1,
            "input": {"channels": 3, "height": 8, "width": 8, "colour_mode": "RGB", "mean": [0.5], "std": [0.2]},
        })


def test_future_schema_versions_are_refused():
    fields = {**member_fields(), "version": 1, "schema_version": 99,
              "artifact": {"path": "model.onnx", "sha256": "0" * 64, "size": 1}}
    with pytest.raises(ValidationError, match="schema_version 99 is not supported"):
        Manifest.model_validate(fields)


@pytest.mark.parametrize("path", ["/etc/passwd", "../other/1/model.onnx", "..", "sub/model.onnx", ".hidden"])
def test_artifact_paths_outside_the_version_folder_are_refused(path):
    with pytest.raises(ValidationError, match="artifact.path"):
        Manifest.model_validate({**member_fields(), "version": 1, "artifact": {"path": path, "sha256": "0" * 64, "size": 1}})


def test_a_manifest_must_describe_the_folder_it_sits_in(tmp_path):
    store = ModelStore(tmp_path)
    store.publish(member_fields(), _artifact(tmp_path))
    store.publish(member_fields(name="other"), _artifact(tmp_path))
    (tmp_path / "m" / "2").mkdir()
    (tmp_path / "m" / "2" / "manifest.json").write_bytes((tmp_path / "other" / "1" / "manifest.json").read_bytes())
    with pytest.raises(StoreError, match=r"m/2/manifest.json describes other:1, not the folder it sits in \(m:2\)"):
        store.resolve("m")


def test_read_artifact_returns_the_bytes_it_checked_and_messages_never_show_the_store_path(tmp_path):
    store = ModelStore(tmp_path / "secret-location")
    manifest = store.publish(member_fields(), _artifact(tmp_path))
    assert store.read_artifact(manifest) == b"onnx bytes"
    store.artifact_path(manifest).write_bytes(b"onnx bytez")
    with pytest.raises(IntegrityError) as caught:
        store.read_artifact(manifest)
    assert "secret-location" not in str(caught.value) and "m:1: artifact model.onnx has sha256" in str(caught.value)
    with pytest.raises(ModelNotFound) as caught:
        store.resolve("nothing")
    assert "secret-location" not in str(caught.value)


def test_stray_folders_are_not_models(tmp_path):
    store = ModelStore(tmp_path)
    store.publish(member_fields(), _artifact(tmp_path))
    (tmp_path / "lost+found").mkdir()
    (tmp_path / ".cache").mkdir()
    assert store.names() == ["m"]


def cascade_fields(thresholds):
    stages = [{"model": {"name": f"m{i}", "version": 1}, "threshold": t, "flops_per_image": 1} for i, t in enumerate(thresholds)]
    return {**member_fields(name="c", kind="cascade"), "version": 1, "io": None, "composition": {"stages": stages}}


def test_only_the_last_cascade_stage_has_no_threshold():
    Manifest.model_validate(cascade_fields([0.9, 0.8, None]))
    for bad in ([None, 0.8, None], [0.9, 0.8, 0.7]):
        with pytest.raises(ValidationError, match="only the last stage has no threshold"):
            Manifest.model_validate(cascade_fields(bad))


def test_manifests_hold_standard_json_only():
    with pytest.raises(ValidationError, match="finite"):
        Manifest.model_validate(cascade_fields([float("inf"), None]))
    with pytest.raises(ValidationError):
        Manifest.model_validate_json(json.dumps(cascade_fields([0.9, None])).replace("0.9", "Infinity"))


def test_a_published_version_is_as_readable_as_its_model_folder(tmp_path):
    """Servers often run as another user than training (a container's UID 10001)."""
    import os
    import stat

    old = os.umask(0o022)
    try:
        store = ModelStore(tmp_path / "store")
        m = store.publish(member_fields(), _artifact(tmp_path))
    finally:
        os.umask(old)
    version_dir = tmp_path / "store" / m.name / str(m.version)
    assert stat.S_IMODE(version_dir.stat().st_mode) == 0o755
    assert stat.S_IMODE((version_dir / "manifest.json").stat().st_mode) == 0o644


def _point(thresholds, members_per_image, reach):
    return {"thresholds": thresholds, "tolerance": 0.01, "val_accuracy": 0.9, "accuracy": 0.9,
            "members_per_image": members_per_image, "reach": reach}


def with_points(points, thresholds=(0.9, 0.8, None)):
    fields = cascade_fields(list(thresholds))
    return {**fields, "composition": {**fields["composition"], "operating_points": points}}


def test_a_cascade_records_operating_points_from_its_default_down_to_its_cheapest():
    manifest = Manifest.model_validate(with_points([
        _point([0.9, 0.8], 2.0, [1.0, 0.6, 0.4]), _point([0.7, 0.6], 1.5, [1.0, 0.4, 0.1]), _point([0.0, 2.0], 1.0, [1.0, 0.0, 0.0]),
    ]))
    assert [p.members_per_image for p in manifest.composition.operating_points] == [2.0, 1.5, 1.0]
    assert Manifest.model_validate(cascade_fields([0.9, 0.8, None])).composition.operating_points == []


@pytest.mark.parametrize("point", [_point([0.9], 2.0, [1.0, 0.6, 0.4]), _point([0.9, 0.8], 2.0, [1.0, 0.6])])
def test_an_operating_point_has_one_threshold_per_early_stage_and_one_reach_per_stage(point):
    with pytest.raises(ValidationError, match=r"operating_points\[0\] needs 2 thresholds and 3 reach values"):
        Manifest.model_validate(with_points([point]))


def test_operating_point_0_is_the_thresholds_the_stages_serve():
    with pytest.raises(ValidationError, match=r"operating_points\[0\] is the served default"):
        Manifest.model_validate(with_points([_point([0.7, 0.6], 1.5, [1.0, 0.4, 0.1])]))


def test_operating_points_never_get_dearer_down_the_list():
    with pytest.raises(ValidationError, match=r"operating_points\[2\] runs 1.6 members per image, more than point 1's 1.5"):
        Manifest.model_validate(with_points([
            _point([0.9, 0.8], 2.0, [1.0, 0.6, 0.4]), _point([0.7, 0.6], 1.5, [1.0, 0.4, 0.1]), _point([0.8, 0.6], 1.6, [1.0, 0.5, 0.1]),
        ]))


def test_only_cascades_have_operating_points():
    fields = {**member_fields(), "version": 1, "artifact": {"path": "model.onnx", "sha256": "0" * 64, "size": 1},
              "composition": {"operating_points": [_point([], 1.0, [1.0])]}}
    with pytest.raises(ValidationError, match="operating_points are for cascades only"):
        Manifest.model_validate(fields)
