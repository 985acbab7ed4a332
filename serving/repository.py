"""Artifact directories → loaded models, looked up by name and version.

Each artifact directory (written by ``cnnctl export``) holds a manifest.json, which
``load_manifest`` checks; the runtime then reads each model file it serves once, checks its sha256
and builds the sessions from those bytes. ``--repository DIR`` serves every artifact directory found
in DIR, one or two levels down (DIR/name/ or DIR/name/version/). Several versions of one model may
be served; an empty version in a request means the highest.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cnnctl.errors import ArtifactError, NotFoundError, UsageError, known
from cnnctl.export.image import PixelLimits
from cnnctl.export.manifest import (
    MANIFEST_NAME, NAME_RULE, Manifest, is_safe_name, load_manifest, shown,
)
from cnnctl.serving.batcher import Batcher
from cnnctl.serving.codec import Codec
from cnnctl.serving.config import ServerConfig
from cnnctl.serving.metrics import ModelMetrics, ServerMetrics
from cnnctl.serving.runtime import CUDA, OrtModel

log = logging.getLogger(__name__)


def find_artifact_dirs(repository: str | Path) -> list[Path]:
    """DIR/name/ and DIR/name/version/ holding a manifest. Hidden directories are skipped: they
    are `cnnctl export`'s work in progress (.name.tmp-*) or what it is replacing (.name.old-*)."""
    root = Path(repository)
    if not root.is_dir():
        raise ArtifactError(f"--repository {str(root)!r} is not a directory")
    found = []
    for pattern in (f"*/{MANIFEST_NAME}", f"*/*/{MANIFEST_NAME}"):
        for manifest in sorted(root.glob(pattern)):
            parts = manifest.parent.relative_to(root).parts
            if any(part.startswith(".") for part in parts):
                continue
            for part in parts:
                if not is_safe_name(part):
                    raise ArtifactError(f"--repository {str(root)!r}: directory {shown(part)} is "
                                        f"not allowed; allowed: {NAME_RULE}")
            found.append(manifest.parent)
    if not found:
        raise ArtifactError(f"--repository {str(root)!r} holds no artifact directories (no "
                            f"*/{MANIFEST_NAME} or */*/{MANIFEST_NAME}); write them with "
                            f"`cnnctl export`")
    return found


def _version_key(version: str) -> tuple[int, int | str]:
    return (1, int(version)) if version.isdigit() else (0, version)


@dataclass
class LoadedModel:
    name: str
    version: str
    directory: Path
    manifest: Manifest
    runtime: OrtModel
    batcher: Batcher
    metrics: ModelMetrics
    codec: Codec
    ready: bool = False

    async def infer(self, x: np.ndarray, deadline: float | None) -> np.ndarray:
        return await self.batcher.submit(x, deadline)


class ModelRepository:
    def __init__(self, models: list[LoadedModel]) -> None:
        self._models: dict[str, dict[str, LoadedModel]] = {}
        for m in models:
            versions = self._models.setdefault(m.name, {})
            if m.version in versions:
                raise ArtifactError(
                    f"model '{m.name}' version '{m.version}' is in both {versions[m.version].directory}"
                    f" and {m.directory}; serve one of them")
            versions[m.version] = m
        # An empty version in a request means the highest: looked up once, not per request.
        self._latest = {name: versions[max(versions, key=_version_key)]
                        for name, versions in self._models.items()}

    @classmethod
    def load(cls, config: ServerConfig, metrics: ServerMetrics) -> ModelRepository:
        """Verify and load every configured artifact. Must run inside the event loop."""
        dirs = [Path(d) for d in config.artifact_dirs]
        if config.repository:
            dirs += find_artifact_dirs(config.repository)
        if not dirs:
            raise UsageError("nothing to serve: give ARTIFACT_DIR arguments or --repository DIR")
        models = []
        pixel_limits = PixelLimits(config.limits.max_image_pixels, config.limits.max_request_pixels)
        for d in dirs:
            # The runtime reads each file it serves once, checks that read and loads it: a
            # separate check here first would leave a window for the file to change.
            manifest = load_manifest(d, verify_files=False)
            runtime = OrtModel(d, manifest, device=config.device, instances=config.instances,
                               intra_op_threads=config.intra_op_threads)
            model_metrics = metrics.for_model(manifest.name, manifest.version)
            batching = config.batching
            if runtime.info.provider == CUDA:  # a GPU run waits rather than computes on the CPU
                batching = dataclasses.replace(batching, inline_below_us=0.0,
                                               inline_full_below_us=0.0)
            batcher = Batcher(manifest.name, runtime.run, batching, runtime.executor,
                              config.instances, model_metrics)
            models.append(LoadedModel(manifest.name, manifest.version, d, manifest, runtime,
                                      batcher, model_metrics, Codec(manifest, config.batching.max_batch_size,
                                                                  pixel_limits)))
            log.info("loaded %s version %s from %s (%s, %s, %d intra-op threads)", manifest.name,
                     manifest.version, d, runtime.info.provider, runtime.info.precision,
                     runtime.info.intra_op_threads)
        return cls(models)

    def __iter__(self):  # type: ignore[no-untyped-def]
        for name in sorted(self._models):
            for version in sorted(self._models[name], key=_version_key):
                yield self._models[name][version]

    def names(self) -> list[str]:
        return sorted(self._models)

    def get(self, name: str, version: str = "") -> LoadedModel:
        versions = self._models.get(name)
        if versions is None:
            raise NotFoundError(f"unknown model '{name}'; served models: {known(self.names())}")
        if not version:
            return self._latest[name]
        model = versions.get(version)
        if model is None:
            raise NotFoundError(f"model '{name}' has no version '{version}'; served versions: "
                                f"{known(sorted(versions, key=_version_key))}")
        return model

    def start(self) -> None:
        for m in self:
            m.batcher.start()
            m.ready = True

    async def drain(self) -> None:
        for m in self:
            m.ready = False
        await asyncio.gather(*(m.batcher.drain() for m in self))
        for m in self:
            m.runtime.close()
