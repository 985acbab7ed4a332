"""Artifact directories → loaded models, looked up by name and version; loading, swapping and
unloading them while the server runs (model control, as Triton's).

Where models come from:
- ``ARTIFACT_DIR`` arguments: each serves its manifest's name and version; all are served.
- ``--repository DIR``: the model ``NAME`` is the directory ``DIR/NAME``, holding either one
  artifact (``DIR/NAME/manifest.json``) or one per version (``DIR/NAME/<version>/``, the
  directory named as the manifest's version). Which versions are served is the model's version
  policy, read from ``DIR/NAME/config.pbtxt`` (Triton's ``version_policy``: ``latest { num_versions:
  N }``, ``all {}`` or ``specific { versions: [...] }``; latest 1 when absent), as Triton does.

Model control (``--model-control-mode``): ``none`` loads everything at start-up and nothing later;
``explicit`` loads and unloads on RepositoryModelLoad/Unload; ``poll`` rescans the repository every
``--repository-poll-secs`` and applies what changed. Every load (start-up included) happens in a
loader thread while the event loop serves: the files' sha256s are checked as they are read, the
sessions warmed up and the golden set checked (readiness.py). Only then is the new version swapped
in, by replacing the model's version table in one step on the event loop; the versions it replaces
drain (what they took in is answered) and are freed, and the new version computes nothing until
they have (Batcher.hold_until), so answers switch from one version to the next at one point in
time. A load that fails changes nothing that is served; the failure is logged and kept as the
version's state in the repository index and ModelReady.

An empty version in a request means the highest served version.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cnnctl.errors import (
    ArtifactError, CnnctlError, NotEnabledError, NotFoundError, UnavailableError, UsageError,
    known,
)
from cnnctl.export.image import PixelLimits
from cnnctl.export.manifest import (
    MANIFEST_NAME, NAME_RULE, Manifest, is_safe_name, load_manifest, shown,
)
from cnnctl.serving.batcher import Batcher
from cnnctl.serving.codec import Codec
from cnnctl.serving.config import ServerConfig
from cnnctl.serving.metrics import ModelMetrics, ServerMetrics
from cnnctl.serving.readiness import make_ready
from cnnctl.serving.runtime import CUDA, OrtModel

log = logging.getLogger(__name__)

CONFIG_NAME = "config.pbtxt"  # a repository model's version policy (Triton's file and field)
# The states of Triton's RepositoryIndex.
READY, LOADING, UNLOADING, UNAVAILABLE = "READY", "LOADING", "UNLOADING", "UNAVAILABLE"
# Files a version directory may hold that its fingerprint looks at (a Triton layout included).
_MAX_FINGERPRINT_FILES = 256

Fingerprint = tuple[tuple[str, int, int], ...]


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
    return found


def _version_key(version: str) -> tuple[int, int | str]:
    return (1, int(version)) if version.isdigit() else (0, version)


# -- what the repository holds ----------------------------------------------------------------


@dataclass(frozen=True)
class VersionDir:
    """One artifact directory that may be served as ``name`` version ``version``."""

    name: str
    version: str
    directory: Path
    fingerprint: Fingerprint = ()  # its files' names, sizes and mtimes: a change means reload
    named_by_directory: bool = False  # DIR/NAME/<version>/: the manifest must say that version


@dataclass(frozen=True)
class VersionPolicy:
    kind: str = "latest"  # latest | all | specific
    num_versions: int = 1  # latest
    versions: tuple[str, ...] = ()  # specific

    def select(self, versions: list[str]) -> list[str]:
        ordered = sorted(versions, key=_version_key)
        if self.kind == "all":
            return ordered
        if self.kind == "specific":
            return [v for v in ordered if v in self.versions]
        return ordered[-self.num_versions:]

    def __str__(self) -> str:
        if self.kind == "latest":
            return f"latest {self.num_versions}"
        return "all" if self.kind == "all" else f"specific {list(self.versions)}"


def read_policy(model_dir: Path) -> VersionPolicy:
    """``config.pbtxt``'s version_policy (Triton's ModelConfig text format; other fields are
    read and ignored); latest 1 without the file or the field."""
    path = model_dir / CONFIG_NAME
    if not path.is_file():
        return VersionPolicy()
    from google.protobuf import text_format

    from cnnctl.protos import model_config_pb2 as mc

    try:
        text = path.read_bytes()[:1 << 20].decode("utf-8")
        config = text_format.Parse(text, mc.ModelConfig(), allow_unknown_field=True)
    except (OSError, UnicodeDecodeError, text_format.ParseError) as exc:
        raise ArtifactError(f"{path}: not a model config ({exc}); allowed: Triton's text format, "
                            f"e.g. 'version_policy: {{ latest: {{ num_versions: 2 }} }}'") from None
    policy = config.version_policy
    which = policy.WhichOneof("policy_choice")
    if which == "all":
        return VersionPolicy("all")
    if which == "specific":
        return VersionPolicy("specific", versions=tuple(str(v) for v in policy.specific.versions))
    if which == "latest":
        if policy.latest.num_versions < 1:
            raise ArtifactError(f"{path}: version_policy latest num_versions "
                                f"{policy.latest.num_versions}; allowed: 1 or more")
        return VersionPolicy("latest", num_versions=policy.latest.num_versions)
    return VersionPolicy()


def fingerprint(directory: Path) -> Fingerprint:
    """Names, sizes and mtimes of the files under a version directory (the manifest and what it
    lists): cheap to take, and it changes when any of them is rewritten."""
    out = []
    for path in sorted(directory.rglob("*"))[:_MAX_FINGERPRINT_FILES]:
        try:
            st = path.stat()
        except OSError:
            continue
        if path.is_file():
            out.append((str(path.relative_to(directory)), st.st_size, st.st_mtime_ns))
    return tuple(out)


@dataclass(frozen=True)
class ModelDir:
    """A repository model: its versions on disk and its policy (or why it cannot be read)."""

    name: str
    versions: list[VersionDir]
    policy: VersionPolicy = VersionPolicy()
    error: str = ""

    def wanted(self) -> list[VersionDir]:
        if len(self.versions) == 1 and not self.versions[0].named_by_directory:
            return self.versions  # DIR/NAME/manifest.json: one artifact, whatever its version
        chosen = set(self.policy.select([v.version for v in self.versions]))
        return [v for v in self.versions if v.version in chosen]


def scan_repository(root: Path) -> dict[str, ModelDir]:
    """Every model directory of the repository (blocking: run it off the event loop). Hidden
    directories are skipped (`cnnctl export`'s work in progress); an unsafe name is refused."""
    if not root.is_dir():
        raise ArtifactError(f"--repository {str(root)!r} is not a directory")
    models: dict[str, ModelDir] = {}
    for model_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        if model_dir.name.startswith("."):
            continue
        if not is_safe_name(model_dir.name):
            raise ArtifactError(f"--repository {str(root)!r}: directory {shown(model_dir.name)} "
                                f"is not allowed; allowed: {NAME_RULE}")
        model = scan_model(model_dir)
        if model is not None:
            models[model.name] = model
    return models


def scan_model(model_dir: Path) -> ModelDir | None:
    """One model directory: DIR/NAME/manifest.json or DIR/NAME/<version>/manifest.json (None if it
    holds neither), and its version policy."""
    name = model_dir.name
    if (model_dir / MANIFEST_NAME).is_file():
        try:  # served under its manifest's version
            version = load_manifest(model_dir, verify_files=False).version
        except ArtifactError:
            version = ""  # the load says what is wrong with it
        return ModelDir(name, [VersionDir(name, version, model_dir, fingerprint(model_dir))])
    versions = []
    for vdir in sorted(p for p in model_dir.iterdir() if p.is_dir()):
        if vdir.name.startswith(".") or not (vdir / MANIFEST_NAME).is_file():
            continue
        if not is_safe_name(vdir.name):
            raise ArtifactError(f"{str(model_dir)!r}: version directory {shown(vdir.name)} is not "
                                f"allowed; allowed: {NAME_RULE}")
        versions.append(VersionDir(name, vdir.name, vdir, fingerprint(vdir), True))
    if not versions:
        return None
    try:
        return ModelDir(name, versions, read_policy(model_dir))
    except ArtifactError as exc:
        return ModelDir(name, versions, error=str(exc))


def model_names(root: Path) -> list[str]:
    """The repository's model names alone (for the index: no manifests read, nothing hashed)."""
    names = []
    for model_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        if model_dir.name.startswith(".") or not is_safe_name(model_dir.name):
            continue
        if (model_dir / MANIFEST_NAME).is_file() or any(
                not v.name.startswith(".") and (v / MANIFEST_NAME).is_file()
                for v in model_dir.iterdir() if v.is_dir()):
            names.append(model_dir.name)
    return names


# -- a loaded model ---------------------------------------------------------------------------


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
    fingerprint: Fingerprint = ()
    note: str = ""  # what readiness checked (readiness.py)

    async def infer(self, x: np.ndarray, deadline: float | None) -> np.ndarray:
        return await self.batcher.submit(x, deadline)


@dataclass
class VersionState:
    state: str
    reason: str = ""
    failed: Fingerprint | None = None  # the files a load failed on: not retried until they change


@dataclass(frozen=True)
class IndexEntry:
    name: str
    version: str
    state: str
    reason: str


@dataclass
class _Sources:
    """Where each model name comes from: ARTIFACT_DIR arguments, or the repository."""

    fixed: dict[str, list[VersionDir]] = field(default_factory=dict)
    repository: Path | None = None


class ModelRepository:
    """The served models, and every change to them. Lookups (``get``) run on the event loop
    without locks: a change replaces a model's version table in one assignment."""

    def __init__(self, config: ServerConfig, metrics: ServerMetrics) -> None:
        self.config = config
        self.metrics = metrics
        self.mode = config.model_control_mode
        self._models: dict[str, dict[str, LoadedModel]] = {}
        # An empty version in a request means the highest: looked up once, not per request.
        self._latest: dict[str, LoadedModel] = {}
        self._states: dict[tuple[str, str], VersionState] = {}
        self._wanted: set[str] = set()  # models the server was told to serve: ServerReady
        self.closing = False  # set as shutdown begins: model control refuses from then on
        self._sources = _Sources(repository=Path(config.repository) if config.repository else None)
        self._seen: dict[tuple[str, str], Fingerprint] = {}  # the last poll's fingerprints
        self._pixel_limits = PixelLimits(config.limits.max_image_pixels,
                                         config.limits.max_request_pixels)
        self._loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model-loader")
        self._lock: asyncio.Lock | None = None  # one change at a time (made on the loop)
        self._poller: asyncio.Task[None] | None = None
        self._closed = False
        self.listeners: list[Callable[[], object]] = []  # called after every change (health)

    # -- start-up
    @classmethod
    def load(cls, config: ServerConfig, metrics: ServerMetrics) -> ModelRepository:
        """Find and load what the server starts with (blocking: nothing is served yet). With
        ``--model-control-mode none`` a model that fails to load stops the start-up; otherwise it
        is left UNAVAILABLE, with its reason, and the server starts."""
        repo = cls(config, metrics)
        strict = repo.mode == "none"
        wanted: list[VersionDir] = []
        for d in config.artifact_dirs:
            manifest = load_manifest(d, verify_files=False)
            v = VersionDir(manifest.name, manifest.version, Path(d), fingerprint(Path(d)))
            versions = repo._sources.fixed.setdefault(v.name, [])
            if any(other.version == v.version for other in versions):
                other = next(o for o in versions if o.version == v.version)
                raise ArtifactError(f"model '{v.name}' version '{v.version}' is in both "
                                    f"{other.directory} and {v.directory}; serve one of them")
            versions.append(v)
            wanted.append(v)
        if repo._sources.repository is not None:
            scanned = scan_repository(repo._sources.repository)
            for name, model in scanned.items():
                if name in repo._sources.fixed:
                    raise ArtifactError(f"model '{name}' is both an ARTIFACT_DIR argument and in "
                                        f"--repository {str(repo._sources.repository)!r}; serve "
                                        f"one of them")
                if repo.mode == "explicit" and name not in config.load_models:
                    continue
                if model.error:
                    if strict:
                        raise ArtifactError(model.error)
                    repo._fail(name, "", model.error, ())
                    repo._wanted.add(name)
                    continue
                wanted += model.wanted()
                for v in model.versions:
                    repo._seen[v.name, v.version] = v.fingerprint
            missing = [n for n in config.load_models if n not in scanned]
            if missing:
                raise UsageError(f"--load-model {', '.join(missing)}: not in --repository "
                                 f"{str(repo._sources.repository)!r}; it holds: "
                                 f"{known(sorted(scanned)) or 'nothing'}")
            if not scanned and strict:
                raise ArtifactError(
                    f"--repository {str(repo._sources.repository)!r} holds no artifact "
                    f"directories (no */{MANIFEST_NAME} or */*/{MANIFEST_NAME}); write them "
                    f"with `cnnctl export`")
        if not wanted and strict:
            raise UsageError("nothing to serve: give ARTIFACT_DIR arguments or --repository DIR")
        for v in wanted:
            repo._wanted.add(v.name)
            try:
                model = repo._build(v)
            except CnnctlError as exc:
                if strict:
                    raise
                repo._fail(v.name, v.version, str(exc), v.fingerprint)
                continue
            repo._add(model)
        return repo

    # -- lookups (event loop)
    def __iter__(self) -> Iterator[LoadedModel]:
        for name in sorted(self._models):
            for version in sorted(self._models[name], key=_version_key):
                yield self._models[name][version]

    def names(self) -> list[str]:
        return sorted(self._models)

    def get(self, name: str, version: str = "") -> LoadedModel:
        versions = self._models.get(name)
        if versions is None:
            why = self.not_ready_reason(name, version)
            if why and name in self._wanted | {n for n, _ in self._states}:
                raise UnavailableError(f"model '{name}' is not ready: {why}")
            raise NotFoundError(f"unknown model '{name}'; served models: {known(self.names())}")
        if not version:
            return self._latest[name]
        model = versions.get(version)
        if model is None:
            state = self._states.get((name, version))
            if state is not None and state.state != READY and state.reason:
                raise UnavailableError(f"model '{name}' version '{version}' is not ready: "
                                       f"{state.reason}")
            raise NotFoundError(f"model '{name}' has no version '{version}'; served versions: "
                                f"{known(sorted(versions, key=_version_key))}")
        return model

    def ready(self) -> bool:
        """Every model the server was told to serve has a ready version."""
        return all(name in self._latest and self._latest[name].ready for name in self._wanted)

    def not_ready_reason(self, name: str, version: str = "") -> str:
        """Why ``name`` (``version``) is not ready; "" when it is, or is unknown."""
        model = (self._latest.get(name) if not version
                 else self._models.get(name, {}).get(version))
        if model is not None and model.ready:
            return ""
        states = [(v, s) for (n, v), s in self._states.items() if n == name
                  and (not version or v == version)]
        if model is not None:
            return "draining"
        if not states:
            return ""
        v, s = max(states, key=lambda vs: _version_key(vs[0]))
        label = f"version {v} " if v else ""
        return f"{label}{s.state}: {s.reason}" if s.reason else f"{label}{s.state}"

    async def index(self, ready_only: bool = False) -> list[IndexEntry]:
        """Every model version the server knows of (and, with a repository, every model in it),
        with its state and reason."""
        entries: dict[tuple[str, str], IndexEntry] = {}
        if self._sources.repository is not None and not self._closed:
            loop = asyncio.get_running_loop()
            try:
                names = await loop.run_in_executor(None, model_names, self._sources.repository)
            except OSError as exc:
                log.warning("repository index: cannot list %s: %s", self._sources.repository,
                            exc)
                names = []
            for name in names:
                entries[name, ""] = IndexEntry(name, "", UNAVAILABLE, "not loaded")
        for (name, version), s in self._states.items():
            entries.pop((name, ""), None)
            entries[name, version] = IndexEntry(name, version, s.state, s.reason)
        for m in self:
            entries.pop((m.name, ""), None)
            state = READY if m.ready else UNLOADING
            reason = self._states.get((m.name, m.version), VersionState(state)).reason
            entries[m.name, m.version] = IndexEntry(m.name, m.version, state, reason)
        out = [entries[k] for k in sorted(entries, key=lambda k: (k[0], _version_key(k[1])))]
        return [e for e in out if e.state == READY] if ready_only else out

    # -- start and stop
    def start(self) -> None:
        """Start the batchers (and, in poll mode, the poller) on the running loop."""
        self._lock = asyncio.Lock()
        for m in self:
            m.batcher.start()
            m.ready = True
        if self.mode == "poll" and self._sources.repository is not None:
            self._poller = asyncio.create_task(self._poll_forever(), name="repository-poll")

    async def drain(self) -> None:
        """Shutdown: stop polling, wait for a load in progress, drain and free every model."""
        self._closed = True
        if self._poller is not None:
            self._poller.cancel()
            await asyncio.gather(self._poller, return_exceptions=True)
        if self._lock is not None:
            await self._lock.acquire()  # a load in progress finishes (and is dropped) first
        for m in self:
            m.ready = False
        await asyncio.gather(*(m.batcher.drain() for m in self))
        for m in self:
            m.runtime.close()
        self._loader.shutdown(wait=False)

    # -- model control: the RPCs' (and REST's) entry points
    async def load_model(self, name: str) -> None:
        """RepositoryModelLoad: load ``name``'s versions as its policy says, swap in the new or
        changed ones, unload those no longer wanted. ArtifactError when a version fails (what was
        served is served still)."""
        self._check_explicit("load")
        loop = asyncio.get_running_loop()
        if name in self._sources.fixed:
            wanted = self._sources.fixed[name]
            wanted = [dataclasses.replace(v, fingerprint=await loop.run_in_executor(
                None, fingerprint, v.directory)) for v in wanted]
        else:
            model = await self._scan_one(name)
            if model.error:
                self._fail(name, "", model.error, ())
                raise ArtifactError(model.error)
            if (state := self._states.get((name, ""))) is not None and state.failed == ():
                del self._states[name, ""]  # its config.pbtxt was bad, and is fixed
            wanted = model.wanted()
        failures = await self._apply(name, wanted, retry_failed=True)
        self._track(name)
        if failures:
            raise ArtifactError(f"model '{name}': {'; '.join(failures)}")

    async def unload_model(self, name: str) -> None:
        """RepositoryModelUnload: stop routing requests to ``name``, answer everything it has
        taken in (queued requests included), then free it."""
        self._check_explicit("unload")
        if name not in self._models and name not in self._wanted:
            raise NotFoundError(f"unknown model '{name}'; loaded models: {known(self.names())}")
        self._wanted.discard(name)
        assert self._lock is not None
        async with self._lock:
            await self._retire(name, list(self._models.get(name, {}).values()), remove=True)

    def _track(self, name: str) -> None:
        """Count a model loaded after start-up in ServerReady once a version of it serves: a
        new model that fails its load is not ready itself (ModelReady, the index say why) but
        does not take the whole server, and every replica reading the same repository, out of
        service."""
        if self._models.get(name):
            self._wanted.add(name)

    def _check_explicit(self, what: str) -> None:
        if self.mode != "explicit":
            raise NotEnabledError(
                f"model {what} requests need --model-control-mode explicit; this server runs "
                f"with --model-control-mode {self.mode}"
                + (" (it applies the repository's changes by itself)" if self.mode == "poll"
                   else ""))
        if self._closed or self.closing:
            raise UnavailableError("the server is shutting down; no model changes")

    async def _scan_one(self, name: str) -> ModelDir:
        root = self._sources.repository
        if root is None:
            raise NotFoundError(f"unknown model '{name}': the server has no --repository, and "
                                f"its ARTIFACT_DIRs serve: {known(sorted(self._sources.fixed))}")
        if not is_safe_name(name):
            raise UsageError(f"model name {shown(name)} is not allowed; allowed: {NAME_RULE}")
        loop = asyncio.get_running_loop()
        model_dir = root / name
        model = (await loop.run_in_executor(None, scan_model, model_dir)
                 if model_dir.is_dir() else None)
        if model is None:
            names = await loop.run_in_executor(None, model_names, root)
            raise NotFoundError(f"no model '{name}' in the repository {str(root)!r}; it holds: "
                                f"{known(names) or 'nothing'}")
        return model

    # -- poll mode
    async def _poll_forever(self) -> None:
        last_error = ""
        while not self._closed:
            await asyncio.sleep(self.config.repository_poll_secs)
            try:
                await self.poll()
                last_error = ""
            except asyncio.CancelledError:
                raise
            except CnnctlError as exc:  # a bad directory name, say: logged once, not every poll
                if str(exc) != last_error:
                    log.error("repository poll: %s; polling on, every %.1f s", exc,
                              self.config.repository_poll_secs)
                last_error = str(exc)
            except Exception:  # noqa: BLE001 - a bad round must not stop the polling
                log.exception("repository poll failed; polling again in %.1f s",
                              self.config.repository_poll_secs)

    async def poll(self) -> None:
        """One rescan: load new and changed versions, unload versions no longer wanted and models
        gone from the repository. A version is loaded once its files have stayed the same for a
        whole poll interval, so that one still being copied in is not tried half-written."""
        assert self._sources.repository is not None
        loop = asyncio.get_running_loop()
        scanned = await loop.run_in_executor(None, scan_repository, self._sources.repository)
        seen, self._seen = self._seen, {(v.name, v.version): v.fingerprint
                                        for m in scanned.values() for v in m.versions}
        for name, model in scanned.items():
            if self._closed:
                return
            if name in self._sources.fixed:
                continue
            if model.error:
                if (name, "") not in self._states or self._states[name, ""].reason != model.error:
                    log.error("model %s: %s", name, model.error)
                self._fail(name, "", model.error, ())
                continue
            if (state := self._states.get((name, ""))) is not None and state.failed == ():
                del self._states[name, ""]  # its config.pbtxt was bad, and is fixed
            wanted = model.wanted()
            if any(seen.get((v.name, v.version)) != v.fingerprint for v in wanted):
                continue  # still being written: next round
            await self._apply(name, wanted, retry_failed=False)
            self._track(name)
        for name in [n for n in self._wanted if n not in scanned and n not in self._sources.fixed]:
            log.info("model %s is gone from the repository: unloading it", name)
            self._wanted.discard(name)
            assert self._lock is not None
            async with self._lock:
                await self._retire(name, list(self._models.get(name, {}).values()), remove=True)

    # -- the change itself
    async def _apply(self, name: str, wanted: list[VersionDir], retry_failed: bool) -> list[str]:
        """Load what ``wanted`` adds or changes, then swap; returns the failures."""
        assert self._lock is not None
        async with self._lock:
            if self._closed:
                raise UnavailableError("the server is shutting down; no model changes")
            current = self._models.get(name, {})
            loads = []
            for v in wanted:
                served = current.get(v.version)
                if served is not None and served.fingerprint == v.fingerprint:
                    continue
                state = self._states.get((name, v.version))
                if (not retry_failed and served is None and state is not None
                        and state.failed == v.fingerprint):
                    continue  # failed on these very files: not retried until they change
                loads.append(v)
            loop = asyncio.get_running_loop()
            loaded: dict[str, LoadedModel] = {}
            failures = []
            for v in loads:
                if v.version not in current:
                    self._states[name, v.version] = VersionState(LOADING)
                    self._changed()
                try:
                    model = await loop.run_in_executor(self._loader, self._build, v)
                except CnnctlError as exc:
                    failures.append(str(exc))
                    self._fail(name, v.version, str(exc), v.fingerprint,
                               still_serving=v.version in current)
                    continue
                if self._closed:  # shut down while it loaded: never served
                    model.runtime.close()
                    raise UnavailableError("the server is shutting down; no model changes")
                loaded[v.version] = model
            keep = {v.version for v in wanted}
            # Unwanted versions go only once everything wanted is served: a failed load (now or
            # on these same files before) leaves what is served as it is.
            complete = all(v.version in current or v.version in loaded for v in wanted)
            gone = [m for ver, m in current.items() if ver not in keep] if complete else []
            replaced = [current[ver] for ver in loaded if ver in current]
            if not loaded and not gone:
                return failures
            table = {ver: m for ver, m in current.items() if m not in gone}
            table.update(loaded)
            # The swap: one assignment each, nothing awaited in between.
            if table:
                self._models[name] = table
                self._latest[name] = table[max(table, key=_version_key)]
            else:  # the policy wants no version present
                self._models.pop(name, None)
                self._latest.pop(name, None)
            retiring = [*replaced, *gone]
            drained = asyncio.ensure_future(self._retire(name, retiring, remove=False))
            for m in loaded.values():
                m.batcher.start()
                if retiring:
                    m.batcher.hold_until(drained)
                m.ready = True
                self._states[name, m.version] = VersionState(READY, m.note)
                log.info("model %s version %s is ready (%s)", name, m.version, m.note)
            self._changed()
            await drained
            return failures

    async def _retire(self, name: str, models: list[LoadedModel], remove: bool) -> None:
        """Drain ``models`` (no longer routed to, or about to be), then free them. ``remove``:
        take the whole model out of the routing tables first (an unload)."""
        if remove:
            self._models.pop(name, None)
            self._latest.pop(name, None)
        for m in models:
            m.ready = False
            if self._models.get(name, {}).get(m.version) is None:  # not replaced by a reload
                self._states[name, m.version] = VersionState(UNLOADING)
        if models:
            self._changed()
        await asyncio.gather(*(m.batcher.drain(f"model '{name}' version '{m.version}' is "
                                               f"being unloaded") for m in models))
        for m in models:
            m.runtime.close()
            if self._models.get(name, {}).get(m.version) is not None:
                continue  # replaced by a reload of the same version: that one's state stands
            self._states[name, m.version] = VersionState(UNAVAILABLE, "unloaded")
            log.info("model %s version %s unloaded", name, m.version)
        if models:
            self._changed()

    def _fail(self, name: str, version: str, reason: str, files: Fingerprint,
              still_serving: bool = False) -> None:
        label = f"model {name}" + (f" version {version}" if version else "")
        if still_serving:
            reason = f"a reload from changed files failed ({reason}); serving the files loaded " \
                     f"before"
            self._states[name, version] = VersionState(READY, reason, files)
        else:
            self._states[name, version] = VersionState(UNAVAILABLE, reason, files)
        log.error("%s failed to load: %s", label, reason)
        self._changed()

    def _changed(self) -> None:
        for listener in self.listeners:
            listener()

    def _add(self, model: LoadedModel) -> None:
        table = dict(self._models.get(model.name, {}))
        table[model.version] = model
        self._models[model.name] = table
        self._latest[model.name] = table[max(table, key=_version_key)]
        self._states[model.name, model.version] = VersionState(READY, model.note)

    def _build(self, v: VersionDir) -> LoadedModel:
        """Blocking (the loader thread, or start-up): read and check the artifact, build the
        sessions, warm them up and run the golden check. ArtifactError says what failed."""
        config = self.config
        # The runtime reads each file it serves once, checks that read and loads it: a
        # separate check here first would leave a window for the file to change.
        manifest = load_manifest(v.directory, verify_files=False)
        if v.named_by_directory and manifest.name != v.name:
            raise ArtifactError(f"{v.directory}: the manifest names model '{manifest.name}', its "
                                f"directory '{v.name}'; re-export with --name {v.name}")
        if v.named_by_directory and manifest.version != v.version:
            raise ArtifactError(f"{v.directory}: the manifest says version "
                                f"'{manifest.version}', its directory '{v.version}'; re-export "
                                f"with --version {v.version}")
        runtime = OrtModel(v.directory, manifest, device=config.device,
                           instances=config.instances, intra_op_threads=config.intra_op_threads)
        try:
            readiness = make_ready(runtime, v.directory, manifest,
                                   config.batching.max_batch_size, config.golden_check)
        except BaseException:
            runtime.close()
            raise
        model_metrics = self.metrics.for_model(manifest.name, manifest.version)
        batching = config.batching
        if runtime.info.provider == CUDA:  # a GPU run waits rather than computes on the CPU
            batching = dataclasses.replace(batching, inline_below_us=0.0,
                                           inline_full_below_us=0.0)
        batcher = Batcher(manifest.name, runtime.run, batching, runtime.executor,
                          config.instances, model_metrics)
        log.info("loaded %s version %s from %s (%s, %s, %d intra-op threads; %s; %.2f s)",
                 manifest.name, manifest.version, v.directory, runtime.info.provider,
                 runtime.info.precision, runtime.info.intra_op_threads, readiness.note,
                 readiness.seconds)
        if not readiness.verified:
            log.warning("model %s version %s: %s", manifest.name, manifest.version,
                        readiness.note)
        return LoadedModel(manifest.name, manifest.version, v.directory, manifest, runtime,
                           batcher, model_metrics,
                           Codec(manifest, config.batching.max_batch_size, self._pixel_limits),
                           fingerprint=v.fingerprint, note=readiness.note)

