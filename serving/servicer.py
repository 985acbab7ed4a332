"""The KServe v2 RPCs (Triton's GRPCInferenceService) over the model repository."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import grpc

from cnnctl import __version__
from cnnctl.errors import (
    CnnctlError,
    NotEnabledError,
    OverloadedError,
    UnavailableError,
    UsageError,
)
from cnnctl.export.manifest import shown
from cnnctl.protos import grpc_service_pb2 as pb
from cnnctl.protos import grpc_service_pb2_grpc as pb_grpc
from cnnctl.protos import model_config_pb2 as mc
from cnnctl.serving.codec import Images
from cnnctl.serving.config import ServerConfig
from cnnctl.serving.errors import code_for, status_for
from cnnctl.serving.repository import LoadedModel, ModelRepository
from cnnctl.serving.runtime import CUDA
from cnnctl.serving.shm import Caller, PeerUsers, SharedMemoryRegistry

log = logging.getLogger(__name__)

SERVER_NAME = "cnnctl"
EXTENSIONS = ("model_configuration", "statistics", "model_repository", "binary_tensor_data")
# ModelReady's trailing metadata when the model is not ready: why (its load failed, draining...).
READY_REASON_KEY = "cnnctl-not-ready-reason"
PLATFORM = "onnxruntime_onnx"
_MESSAGE_OVERHEAD = 1024  # a request's fields besides its data, counted toward --max-pending-mb
_NO_DEADLINE_S = 1e6  # grpc reports "no deadline" as a huge time_remaining()
_STREAM_REFUSED = "the server is shutting down; this stream takes no more requests"
_END, _STOP = object(), object()  # in a stream's answer queue: all answered; shutting down
T = TypeVar("T")
Handler = Callable[[Any, Any, grpc.aio.ServicerContext], Awaitable[T]]


class Malformed:
    """A request message that did not parse: what ``lenient`` hands the handler instead."""

    def __init__(self, kind: str, error: Exception) -> None:
        self.message = f"malformed {kind}: {error}"


def lenient(parse: Callable[[bytes], Any], kind: str) -> Callable[[bytes], Any]:
    """A request deserializer that never raises: a message that does not parse reaches the
    handler as Malformed, and is answered INVALID_ARGUMENT (gRPC would answer UNKNOWN)."""

    def parse_or_flag(data: bytes) -> Any:
        try:
            return parse(data)
        except Exception as exc:  # noqa: BLE001 - protobuf's DecodeError, or anything
            return Malformed(kind, exc)

    return parse_or_flag


def _status_on_error(handler: Handler[T]) -> Handler[T]:
    """The RPC handler (anything that returns an awaitable), its failures answered with the
    status their exception maps to (serving/errors.py): every error leaves a handler this way."""

    @functools.wraps(handler)
    async def rpc(self: Any, request: Any, context: grpc.aio.ServicerContext) -> T:
        try:
            if request.__class__ is Malformed:
                raise UsageError(request.message)
            return await handler(self, request, context)
        except Exception as exc:  # noqa: BLE001 - every failure leaves through the status table
            code, message = status_for(exc)
            await context.abort(code, message)
            raise  # unreachable: abort raises

    return rpc


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, repository: ModelRepository, config: ServerConfig, port: int = 0) -> None:
        """``port``: the one the server listens on (to tell shared-memory clients' users)."""
        self.repo = repository
        self.config = config
        self.accepting = True  # False: new inference requests are refused (UNAVAILABLE)
        self._streams: set[asyncio.Queue[Any]] = set()  # the answer queues of open streams
        self._no_streams = asyncio.Event()
        self._no_streams.set()
        self.draining = False  # True from the shutdown signal on: ServerReady says false
        self.active = 0  # inference RPCs being answered
        # Bytes held by requests accepted and not yet answered (Codec.bytes_per_image says what
        # a request counts), bounded by --max-pending-mb.
        self.pending_bytes = 0
        self._max_pending = config.limits.max_pending_bytes
        self._idle = asyncio.Event()
        self._idle.set()
        # Image decoding is CPU work: a small pool beside the inference threads.
        self._preprocess = ThreadPoolExecutor(max_workers=2, thread_name_prefix="preprocess")
        self.shm = (SharedMemoryRegistry(config.shm_dir,
                                         max_regions=config.max_shared_memory_regions,
                                         peers=PeerUsers(config.host, port or config.port))
                    if config.allow_shared_memory else None)

    def stop_accepting(self) -> None:
        """Refuse new inference requests (UNAVAILABLE); open streams end once the requests
        they have read are answered."""
        self.accepting = False
        for answers in self._streams:
            answers.put_nowait(_STOP)

    def close(self) -> None:
        self.stop_accepting()
        self._preprocess.shutdown(wait=False)
        if self.shm is not None:
            self.shm.close()

    async def wait_idle(self) -> None:
        """Until no inference RPC is being answered."""
        await self._idle.wait()

    async def wait_streams_closed(self) -> None:
        """Until no ModelStreamInfer stream is open."""
        await self._no_streams.wait()

    def _enter(self) -> None:
        self.active += 1
        self._idle.clear()

    def _leave(self) -> None:
        self.active -= 1
        if self.active == 0:
            self._idle.set()

    # -- health and metadata
    @_status_on_error
    async def ServerLive(self, request: pb.ServerLiveRequest,
                         context: grpc.aio.ServicerContext) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    @_status_on_error
    async def ServerReady(self, request: pb.ServerReadyRequest,
                          context: grpc.aio.ServicerContext) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=not self.draining and self.repo.ready())

    @_status_on_error
    async def ServerMetadata(self, request: pb.ServerMetadataRequest,
                             context: grpc.aio.ServicerContext) -> pb.ServerMetadataResponse:
        providers = sorted({m.runtime.info.provider for m in self.repo})
        shm = ["system_shared_memory"] if self.shm is not None else []
        return pb.ServerMetadataResponse(
            name=SERVER_NAME, version=__version__,
            extensions=[*EXTENSIONS, *shm, *(f"cnnctl:execution_provider={p}" for p in providers)])

    @_status_on_error
    async def ModelReady(self, request: pb.ModelReadyRequest,
                         context: grpc.aio.ServicerContext) -> pb.ModelReadyResponse:
        # A probe gets an answer, not an error: an unknown model is simply not ready.
        try:
            model = self.repo.get(request.name, request.version)
            ready = model.ready and not self.draining
        except CnnctlError:
            ready = False
        if not ready:  # the reason rides in the trailing metadata (the message has no field)
            why = "shutting down" if self.draining else (
                self.repo.not_ready_reason(request.name, request.version) or "unknown model")
            context.set_trailing_metadata(((READY_REASON_KEY, _ascii(why)),))
        return pb.ModelReadyResponse(ready=ready)

    @_status_on_error
    async def ModelMetadata(self, request: pb.ModelMetadataRequest,
                            context: grpc.aio.ServicerContext) -> pb.ModelMetadataResponse:
        model = self.repo.get(request.name, request.version)
        versions = [m.version for m in self.repo if m.name == model.name]
        man = model.manifest
        return pb.ModelMetadataResponse(
            name=model.name, versions=versions, platform=PLATFORM,
            inputs=[pb.ModelMetadataResponse.TensorMetadata(
                name=man.input.name, datatype=man.input.datatype, shape=man.input.shape)],
            outputs=[pb.ModelMetadataResponse.TensorMetadata(
                name=man.output.name, datatype=man.output.datatype, shape=man.output.shape)])

    @_status_on_error
    async def ModelConfig(self, request: pb.ModelConfigRequest,
                          context: grpc.aio.ServicerContext) -> pb.ModelConfigResponse:
        model = self.repo.get(request.name, request.version)
        return pb.ModelConfigResponse(config=model_config(model, self.config))

    @_status_on_error
    async def ModelStatistics(self, request: pb.ModelStatisticsRequest,
                              context: grpc.aio.ServicerContext) -> pb.ModelStatisticsResponse:
        if request.name:
            self.repo.get(request.name, request.version)  # NOT_FOUND if unknown
        chosen = [m for m in self.repo if (not request.name or m.name == request.name)
                  and (not request.version or m.version == request.version)]
        return pb.ModelStatisticsResponse(model_stats=[m.metrics.statistics() for m in chosen])

    @_status_on_error
    async def RepositoryIndex(self, request: pb.RepositoryIndexRequest,
                              context: grpc.aio.ServicerContext) -> pb.RepositoryIndexResponse:
        index = pb.RepositoryIndexResponse()
        for e in await self.repo.index(ready_only=request.ready):
            reason = "shutting down" if self.draining and e.state == "READY" else e.reason
            index.models.add(name=e.name, version=e.version, state=e.state, reason=reason)
        return index

    @_status_on_error
    async def RepositoryModelLoad(self, request: pb.RepositoryModelLoadRequest,
                                  context: grpc.aio.ServicerContext
                                  ) -> pb.RepositoryModelLoadResponse:
        _check_repository_request(request.repository_name, request.parameters, ())
        await self.repo.load_model(request.model_name)
        return pb.RepositoryModelLoadResponse()

    @_status_on_error
    async def RepositoryModelUnload(self, request: pb.RepositoryModelUnloadRequest,
                                    context: grpc.aio.ServicerContext
                                    ) -> pb.RepositoryModelUnloadResponse:
        # tritonclient always sends unload_dependents; cnnctl models have no dependents.
        _check_repository_request(request.repository_name, request.parameters,
                                  ("unload_dependents",))
        await self.repo.unload_model(request.model_name)
        return pb.RepositoryModelUnloadResponse()

    # -- system shared memory (serving/shm.py)
    @_status_on_error
    async def SystemSharedMemoryStatus(self, request: pb.SystemSharedMemoryStatusRequest,
                                       context: grpc.aio.ServicerContext
                                       ) -> pb.SystemSharedMemoryStatusResponse:
        regions = self._registry(context).status(request.name)
        out = pb.SystemSharedMemoryStatusResponse()
        for r in regions:
            out.regions[r.name].CopyFrom(pb.SystemSharedMemoryStatusResponse.RegionStatus(
                name=r.name, key=r.key, offset=r.offset, byte_size=r.byte_size))
        return out

    @_status_on_error
    async def SystemSharedMemoryRegister(self, request: pb.SystemSharedMemoryRegisterRequest,
                                         context: grpc.aio.ServicerContext
                                         ) -> pb.SystemSharedMemoryRegisterResponse:
        region = self._registry(context).register(request.name, request.key, request.offset,
                                                  request.byte_size)
        log.info("registered shared-memory region %r for user %d (key %s, offset %d, %d bytes)",
                 region.name, region.uid, region.key, region.offset, region.byte_size)
        return pb.SystemSharedMemoryRegisterResponse()

    @_status_on_error
    async def SystemSharedMemoryUnregister(self, request: pb.SystemSharedMemoryUnregisterRequest,
                                           context: grpc.aio.ServicerContext
                                           ) -> pb.SystemSharedMemoryUnregisterResponse:
        self._registry(context).unregister(request.name)
        return pb.SystemSharedMemoryUnregisterResponse()

    def _registry(self, context: grpc.aio.ServicerContext) -> Caller:
        if self.shm is None:
            raise NotEnabledError("system shared memory is off; start cnnctl serve with "
                                  "--allow-shared-memory to register regions")
        return self.shm.for_peer(context.peer())

    def _shm_for(self, context: grpc.aio.ServicerContext) -> Caller | None:
        """The regions a request may name: its client's user's (looked up only if it names
        one); None while the extension is off."""
        return None if self.shm is None else self.shm.for_peer(context.peer())

    # -- inference
    @_status_on_error
    def ModelInfer(self, request: pb.ModelInferRequest,
                   context: grpc.aio.ServicerContext) -> Awaitable[pb.ModelInferResponse]:
        # Not async: infer's own coroutine is awaited by the wrapper, one coroutine less per
        # request on the event loop.
        remaining = context.time_remaining()
        deadline = None
        if remaining is not None and remaining < _NO_DEADLINE_S:
            deadline = asyncio.get_running_loop().time() + remaining
        return self.infer(request, deadline, shm=self._shm_for(context))

    async def ModelStreamInfer(self, request_iterator: AsyncIterator[pb.ModelInferRequest],
                               context: grpc.aio.ServicerContext) -> None:
        # Requests of one stream are computed concurrently (so they can share batches); each
        # answer carries its request's id, and an error is an answer too, not the stream's end.
        # When the server stops accepting (shutdown), the stream reads no more requests, sends
        # the answers of those it has read and ends with UNAVAILABLE: a client's open stream must
        # not hold the shutdown for the whole grace period.
        if not self.accepting:
            await context.abort(grpc.StatusCode.UNAVAILABLE, _STREAM_REFUSED)
        loop = asyncio.get_running_loop()
        remaining = context.time_remaining()
        # The stream's own deadline bounds each of its requests (as does each one's "timeout").
        deadline = (loop.time() + remaining if remaining is not None
                    and remaining < _NO_DEADLINE_S else None)
        answers: asyncio.Queue[Any] = asyncio.Queue()  # answers, then _END; or _STOP
        # A request read takes a slot until its answer is sent: a client that sends and never
        # reads holds max_stream_inflight requests, and gRPC's flow control holds the rest.
        slots = asyncio.Semaphore(self.config.limits.max_stream_inflight)
        # The requests not answered yet, and only those: a long-lived stream would otherwise
        # keep every request's finished task.
        waiting: set[asyncio.Task[None]] = set()
        shm = self._shm_for(context)  # one connection: its user looked up once at most

        async def one(req: pb.ModelInferRequest) -> None:
            try:
                if req.__class__ is Malformed:
                    raise UsageError(req.message)
                answer = pb.ModelStreamInferResponse(
                    infer_response=await self.infer(req, deadline, accepted=True, shm=shm))
            except Exception as exc:  # noqa: BLE001
                _, message = status_for(exc)
                answer = pb.ModelStreamInferResponse(error_message=message)
                if req.__class__ is not Malformed:
                    answer.infer_response.CopyFrom(pb.ModelInferResponse(
                        model_name=req.model_name, model_version=req.model_version, id=req.id))
            finally:
                # Itself, directly: a done callback would cost every request one more loop step.
                waiting.discard(asyncio.current_task())  # type: ignore[arg-type]
            answers.put_nowait(answer)

        async def read() -> None:
            try:
                requests = request_iterator.__aiter__()
                while True:
                    await slots.acquire()
                    try:
                        req = await requests.__anext__()
                    except StopAsyncIteration:
                        break
                    waiting.add(asyncio.create_task(one(req)))
                if waiting:  # not gather: cancelling this (shutdown) must not cancel them
                    await asyncio.wait(waiting)
            finally:
                answers.put_nowait(_END)

        reader = asyncio.create_task(read())
        self._streams.add(answers)
        self._no_streams.clear()
        try:
            while (answer := await answers.get()) is not _END:
                if answer is _STOP:
                    break
                if not await _write(context, answer):
                    return  # the client has gone
                slots.release()
            else:
                return  # the client is done sending, and every request is answered
            reader.cancel()  # shutting down: read no more requests ...
            await asyncio.wait([reader])
            if waiting:  # ... answer those read ...
                await asyncio.wait(waiting)
            while not answers.empty():
                if isinstance(answer := answers.get_nowait(), pb.ModelStreamInferResponse):
                    if not await _write(context, answer):
                        return
            await context.abort(grpc.StatusCode.UNAVAILABLE, _STREAM_REFUSED)  # ... and end
        finally:
            self._streams.discard(answers)
            if not self._streams:
                self._no_streams.set()
            reader.cancel()

    async def infer(self, request: pb.ModelInferRequest, deadline: float | None,
                    accepted: bool = False, shm: Caller | None = None
                    ) -> pb.ModelInferResponse:
        """One request, start to end; raises CnnctlError subclasses for the status table.
        ``accepted``: taken in before the server stopped accepting (a stream's request, read
        before the stream learnt of the shutdown), so computed whatever happens since. ``shm``:
        the shared-memory regions its client may name."""
        if not accepted and not self.accepting:
            raise UnavailableError("the server is shutting down; not accepting new requests")
        model = self.repo.get(request.model_name, request.model_version)
        start = time.perf_counter()
        model.metrics.request()
        self._enter()
        cost = 0
        try:
            if request.parameters:
                deadline = _with_timeout(request, deadline)
            x, images, output_view = model.codec.decode(request, shm)
            # Bounded by now: decode refused more images than the max batch size. Not
            # request.ByteSize(): protobuf computes it by serializing the message again.
            need = _MESSAGE_OVERHEAD + (
                model.codec.bytes_per_image * len(x) + x.nbytes if images is None
                else model.codec.bytes_per_image * images.count + images.nbytes)
            if self.pending_bytes + need > self._max_pending:
                raise OverloadedError(
                    f"the server holds {self.pending_bytes >> 10} KiB of requests not yet "
                    f"answered; this one's {need >> 10} KiB more would be over --max-pending-mb "
                    f"{self._max_pending >> 20}; retry later")
            cost = need
            self.pending_bytes += cost
            if x is None:
                y = await self._infer_images(model, images, deadline)
            else:
                y = await model.infer(x, deadline)
            response = model.codec.encode(request, y, output_view)
        except Exception as exc:
            model.metrics.failed(code_for(exc).name, time.perf_counter() - start)
            raise
        finally:
            self.pending_bytes -= cost
            self._leave()
        model.metrics.succeeded(time.perf_counter() - start)
        return response

    async def _infer_images(self, model: LoadedModel, images: Images,
                            deadline: float | None) -> Any:
        """Encoded images: decoded off the event loop (CPU work), their place in the model's
        queue held meanwhile, so that they count toward its bound; not decoded at all once
        the deadline has passed or the call is cancelled."""
        loop = asyncio.get_running_loop()
        expired = None if deadline is None else functools.partial(_passed, loop.time, deadline)
        model.batcher.reserve()
        try:
            x = await loop.run_in_executor(self._preprocess, model.codec.preprocess, images,
                                           expired)
        except BaseException:
            model.batcher.release()
            raise
        return await model.batcher.submit(x, deadline, reserved=True)


def _check_repository_request(repository: str, parameters: Any, allowed: tuple[str, ...]) -> None:
    """Model control loads what the repository holds, nothing a client sends: Triton's config
    override and model-file upload parameters are refused."""
    if repository:
        raise UsageError(f"repository_name {shown(repository)}: cnnctl serves one repository; "
                         f"leave it empty")
    extra = sorted(k for k in parameters if k not in allowed)
    if extra:
        raise UsageError(f"parameters {shown(extra)} are not supported; cnnctl loads models only "
                         f"from its repository (no config override, no uploaded files)"
                         + (f"; allowed: {', '.join(allowed)}" if allowed else ""))


def _ascii(text: str) -> str:
    """gRPC metadata values must be printable ASCII."""
    return text.encode("ascii", "backslashreplace").decode("ascii")[:1000]


async def _write(context: grpc.aio.ServicerContext, answer: pb.ModelStreamInferResponse) -> bool:
    """Send one answer of a stream; False when the client has cancelled it or gone (a write
    then fails, and gRPC would log the failure of a yielded answer with a traceback: a client
    could fill the log by cancelling streams)."""
    try:
        await context.write(answer)
    except Exception:  # noqa: BLE001 - grpc's ExecuteBatchError or InvalidStateError
        return False
    return True


def _passed(now: Callable[[], float], deadline: float) -> bool:
    return now() >= deadline


def _with_timeout(request: pb.ModelInferRequest, deadline: float | None) -> float | None:
    """The request's deadline, brought forward by its "timeout" parameter (µs, as Triton's
    clients send it) when it has one."""
    if "timeout" not in request.parameters:
        return deadline
    param = request.parameters["timeout"]
    kind = param.WhichOneof("parameter_choice")
    if kind not in ("int64_param", "uint64_param") or getattr(param, kind) <= 0:
        value = getattr(param, kind) if kind else None
        raise UsageError(f"parameter 'timeout' must be a positive integer (microseconds), got "
                         f"{value!r}")
    end = asyncio.get_running_loop().time() + getattr(param, kind) / 1e6
    return end if deadline is None else min(deadline, end)


def model_config(model: LoadedModel, config: ServerConfig) -> mc.ModelConfig:
    man = model.manifest
    info = model.runtime.info
    out = mc.ModelConfig(
        name=model.name, platform=PLATFORM, backend="onnxruntime",
        max_batch_size=config.batching.max_batch_size,
        default_model_filename=man.file("onnx", info.precision).path)  # type: ignore[union-attr]
    # Triton's convention with max_batch_size > 0: dims leave out the batch dimension.
    out.input.add(name=man.input.name, data_type=mc.TYPE_FP32, format=mc.ModelInput.FORMAT_NCHW,
                  dims=man.input.shape[1:])
    out.output.add(name=man.output.name, data_type=mc.TYPE_FP32, dims=man.output.shape[1:])
    if config.batching.enabled:
        out.dynamic_batching.max_queue_delay_microseconds = int(
            config.batching.max_queue_delay_ms * 1000)
        out.dynamic_batching.default_queue_policy.max_queue_size = config.batching.max_queue_size
    kind = mc.ModelInstanceGroup.KIND_GPU if info.provider == CUDA else (
        mc.ModelInstanceGroup.KIND_CPU)
    out.instance_group.add(name=f"{model.name}_0", kind=kind, count=config.instances)
    out.parameters["execution_provider"].string_value = info.provider
    out.parameters["precision"].string_value = info.precision
    out.parameters["intra_op_threads"].string_value = str(info.intra_op_threads)
    out.parameters["model"].string_value = man.model
    # What a client needs to label results and preprocess on its side (clients/protocol.py).
    out.parameters["class_names"].string_value = json.dumps(man.class_names)
    out.parameters["image"].string_value = json.dumps(dataclasses.asdict(man.image))
    return out
