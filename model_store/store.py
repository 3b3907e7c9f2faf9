"""A folder of published model versions: ``<root>/<name>/<version>/{manifest.json, model.onnx}``.

Publishing is atomic: a version is assembled in a hidden temporary folder inside the store and
renamed into place, so a reader either sees a complete version or none. Concurrent publishers of
one name get distinct versions because a rename onto an existing (non-empty) version folder fails
and the loser retries with the next number.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from .manifest import Artifact, Manifest, ModelRef

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")  # the manifest's name pattern: skips lost+found, .hidden

MANIFEST_FILE = "manifest.json"
ARTIFACT_FILE = "model.onnx"
_TEMP_PREFIX = ".publishing-"
_MAX_PUBLISH_ATTEMPTS = 1000


class StoreError(Exception):
    """Base of the store's errors; the message says what was wrong and where."""


class ModelNotFound(StoreError):
    pass


class IntegrityError(StoreError):
    """An artifact on disk differs from what its manifest promises (size or sha256)."""


def sha256_of(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


class ModelStore:
    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)

    # ---- writing -------------------------------------------------------------------------
    def publish(self, fields: dict[str, Any], onnx_file: Path | None = None) -> Manifest:
        """Publish a new version of ``fields["name"]`` and return its manifest.

        ``fields`` are the manifest's fields without ``version`` and ``artifact``: the store assigns
        the next free version and records the ONNX file's sha256 and size. The manifest is validated
        before anything becomes visible.
        """
        name = fields["name"]
        model_dir = self.root / name
        model_dir.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=_TEMP_PREFIX, dir=model_dir))
        # mkdtemp makes it 0700; a version must be as readable as its model folder (umask applied),
        # or a server running as another user (a container's non-root user) cannot load it
        staging.chmod(model_dir.stat().st_mode & 0o777)
        try:
            if onnx_file is not None:
                shutil.copyfile(onnx_file, staging / ARTIFACT_FILE)
                artifact = Artifact(
                    path=ARTIFACT_FILE,
                    sha256=sha256_of(staging / ARTIFACT_FILE),
                    size=(staging / ARTIFACT_FILE).stat().st_size,
                )
                fields = {**fields, "artifact": artifact}
            version = max(self.versions(name), default=0) + 1
            for _ in range(_MAX_PUBLISH_ATTEMPTS):
                manifest = Manifest.model_validate({**fields, "version": version})
                _write_json(staging / MANIFEST_FILE, manifest.model_dump(mode="json"))
                try:
                    os.rename(staging, model_dir / str(version))
                    return manifest
                except OSError as exc:
                    if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                        raise
                    version += 1  # another publisher took this number first
            raise StoreError(f"could not find a free version for {name!r} after {_MAX_PUBLISH_ATTEMPTS} tries")
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    # ---- reading -------------------------------------------------------------------------
    def names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and _NAME.match(p.name))

    def versions(self, name: str) -> list[int]:
        """Complete versions of ``name``, ascending (folders still being published are hidden)."""
        model_dir = self.root / name
        if not model_dir.is_dir():
            return []
        return sorted(
            int(p.name) for p in model_dir.iterdir() if p.name.isdigit() and (p / MANIFEST_FILE).is_file()
        )

    def version_dir(self, ref: ModelRef) -> Path:
        return self.root / ref.name / str(ref.version)

    def resolve(self, name: str, version: int | None = None) -> Manifest:
        """The manifest of ``name`` at ``version``, or at its highest complete version."""
        available = self.versions(name)
        if not available:
            raise ModelNotFound(f"no model named {name!r} in the store")
        if version is None:
            version = available[-1]
        elif version not in available:
            raise ModelNotFound(f"model {name!r} has no version {version} (available: {available})")
        where = f"{name}/{version}/{MANIFEST_FILE}"  # store-relative: messages may reach clients
        try:
            manifest = Manifest.model_validate_json((self.root / where).read_bytes())
        except ValidationError as exc:
            raise StoreError(f"{where} is not a valid manifest: {exc}") from None
        if (manifest.name, manifest.version) != (name, version):
            raise StoreError(f"{where} describes {manifest.ref}, not the folder it sits in ({name}:{version})")
        return manifest

    def latest(self) -> list[Manifest]:
        """The highest version of every model in the store."""
        return [self.resolve(name) for name in self.names() if self.versions(name)]

    def artifact_path(self, manifest: Manifest) -> Path:
        if manifest.artifact is None:
            raise StoreError(f"{manifest.ref} is composite and has no artifact")
        return self.version_dir(manifest.ref) / manifest.artifact.path

    def read_artifact(self, manifest: Manifest) -> bytes:
        """The artifact's bytes, checked against the manifest's size and sha256.

        The bytes checked are the bytes returned: load them, never the path again, so a file swapped
        after the check cannot be loaded unchecked. Raises ``IntegrityError`` naming the file
        (store-relative), what was expected and what was found.
        """
        path = self.artifact_path(manifest)
        assert manifest.artifact is not None
        where = f"{manifest.ref}: artifact {manifest.artifact.path}"
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise IntegrityError(f"{where} is missing") from None
        if len(data) != manifest.artifact.size:
            raise IntegrityError(f"{where} has {len(data)} bytes, manifest says {manifest.artifact.size}")
        digest = hashlib.sha256(data).hexdigest()
        if digest != manifest.artifact.sha256:
            raise IntegrityError(f"{where} has sha256 {digest}, manifest says {manifest.artifact.sha256}")
        return data

    def verify(self, manifest: Manifest) -> Path:
        """Check the artifact (as ``read_artifact``) and return its path, for tools that load by path."""
        self.read_artifact(manifest)
        return self.artifact_path(manifest)


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
