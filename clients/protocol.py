"""The client's side of the KServe v2 protocol, without I/O: shared by ``Client`` and ``AsyncClient``.

Building requests, splitting large inputs into requests that fit, reading responses, and turning
logits into per-image predictions all live here, so the sync and asyncio clients differ only in
how they wait.

What the client learns about a model, and from where:

- input/output names, datatypes and shapes: ``ModelMetadata`` (standard KServe v2);
- the largest batch: ``ModelConfig.max_batch_size`` (standard Triton);
- class names: ``ModelConfig.parameters["class_names"]``, a JSON list of strings, one per output
  index (cnnctl's field; Triton keeps labels in a file the client cannot read). Without it, the
  labels are the output indices as strings;
- image preprocessing (for ``preprocess="client"`` only): ``ModelConfig.parameters["image"]``, a
  JSON object with the manifest's ImageSpec fields ``channels, height, width, mean, std``.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from cnnctl.errors import UsageError
from cnnctl.export.image import ImageSpec
from cnnctl.protos import grpc_service_pb2 as pb
from cnnctl.protos import model_config_pb2 as mc

log = logging.getLogger(__name__)

CLASS_NAMES_PARAMETER = "class_names"
IMAGE_PARAMETER = "image"
# Room for everything in a request besides the tensor bytes (names, shape, per-element prefixes
# are counted separately): generous, so a chunk never lands just over the server's limit.
MESSAGE_OVERHEAD_BYTES = 64 * 1024


@dataclass(frozen=True)
class ModelInfo:
    name: str
    version: str  # the version asked for ("" = the server's choice)
    versions: tuple[str, ...]
    platform: str
    input_name: str
    input_datatype: str
    input_shape: tuple[int, ...]  # -1 for the batch dimension
    output_name: str
    output_shape: tuple[int, ...]
    max_batch_size: int  # 0: the server gives no limit
    class_names: tuple[str, ...]
    image: ImageSpec | None  # None: the server does not publish its preprocessing
    parameters: dict[str, str] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return int(self.output_shape[-1]) if self.output_shape else len(self.class_names)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name, "versions": list(self.versions), "platform": self.platform,
            "input": {"name": self.input_name, "datatype": self.input_datatype,
                      "shape": list(self.input_shape)},
            "output": {"name": self.output_name, "shape": list(self.output_shape)},
            "max_batch_size": self.max_batch_size, "class_names": list(self.class_names),
            "image": None if self.image is None else asdict(self.image),
            "parameters": self.parameters,
        }


def model_info(version: str, metadata: pb.ModelMetadataResponse,
               config: mc.ModelConfig | None) -> ModelInfo:
    if len(metadata.inputs) != 1 or len(metadata.outputs) != 1:
        raise UsageError(f"model '{metadata.name}' has {len(metadata.inputs)} inputs and "
                         f"{len(metadata.outputs)} outputs; this client handles image classifiers "
                         f"with exactly one of each")
    inp, out = metadata.inputs[0], metadata.outputs[0]
    params = {k: v.string_value for k, v in config.parameters.items()} if config else {}
    output_shape = tuple(int(s) for s in out.shape)
    classes = int(output_shape[-1]) if output_shape and output_shape[-1] > 0 else 0
    names: tuple[str, ...] = tuple(str(i) for i in range(classes))
    if CLASS_NAMES_PARAMETER in params:
        try:
            parsed = json.loads(params[CLASS_NAMES_PARAMETER])
            if isinstance(parsed, list) and (not classes or len(parsed) == classes):
                names = tuple(str(n) for n in parsed)
            else:
                log.warning("model %s: ignoring class_names parameter (%d names for %d classes)",
                            metadata.name, len(parsed) if isinstance(parsed, list) else -1, classes)
        except ValueError:
            log.warning("model %s: class_names parameter is not JSON; using indices",
                        metadata.name)
    image = None
    if IMAGE_PARAMETER in params:
        try:
            spec = json.loads(params[IMAGE_PARAMETER])
            image = ImageSpec(channels=int(spec["channels"]), height=int(spec["height"]),
                              width=int(spec["width"]), mean=[float(m) for m in spec["mean"]],
                              std=[float(s) for s in spec["std"]])
        except (ValueError, KeyError, TypeError):
            log.warning("model %s: malformed image parameter %r; client-side preprocessing off",
                        metadata.name, params[IMAGE_PARAMETER])
    return ModelInfo(
        name=metadata.name, version=version, versions=tuple(metadata.versions),
        platform=metadata.platform, input_name=inp.name, input_datatype=inp.datatype,
        input_shape=tuple(int(s) for s in inp.shape), output_name=out.name,
        output_shape=output_shape, max_batch_size=int(config.max_batch_size) if config else 0,
        class_names=names, image=image, parameters=params)


# --- requests ----------------------------------------------------------------------------------


def tensor_request(info: ModelInfo, x: np.ndarray, rid: str = "") -> pb.ModelInferRequest:
    x = np.ascontiguousarray(x, dtype="<f4")
    req = pb.ModelInferRequest(model_name=info.name, model_version=info.version, id=rid)
    req.inputs.add(name=info.input_name, datatype="FP32", shape=x.shape)
    req.outputs.add(name=info.output_name)
    req.raw_input_contents.append(x.tobytes())
    return req


def bytes_request(info: ModelInfo, images: Sequence[bytes], rid: str = "") -> pb.ModelInferRequest:
    from cnnctl.clients.images import pack_bytes

    req = pb.ModelInferRequest(model_name=info.name, model_version=info.version, id=rid)
    req.inputs.add(name=info.input_name, datatype="BYTES", shape=[len(images)])
    req.outputs.add(name=info.output_name)
    req.raw_input_contents.append(pack_bytes(images))
    return req


def plan_chunks(sizes: Sequence[int], max_batch: int, max_bytes: int) -> list[slice]:
    """Consecutive slices of the items, each at most ``max_batch`` items (0: no limit) and at most
    ``max_bytes`` of payload; an item bigger than ``max_bytes`` goes alone (the server decides)."""
    budget = max(1, max_bytes - MESSAGE_OVERHEAD_BYTES)
    chunks: list[slice] = []
    start, used = 0, 0
    for i, size in enumerate(sizes):
        full = (max_batch and i - start >= max_batch) or (i > start and used + size > budget)
        if full:
            chunks.append(slice(start, i))
            start, used = i, 0
        used += size
    if start < len(sizes):
        chunks.append(slice(start, len(sizes)))
    return chunks


def logits_of(response: pb.ModelInferResponse, info: ModelInfo) -> np.ndarray:
    for i, out in enumerate(response.outputs):
        if out.name == info.output_name:
            shape = [int(s) for s in out.shape]
            if i < len(response.raw_output_contents):
                data = np.frombuffer(response.raw_output_contents[i], dtype="<f4")
            else:
                data = np.asarray(out.contents.fp32_contents, dtype=np.float32)
            if data.size != math.prod(shape):
                raise UsageError(f"response output '{out.name}' has {data.size} values for shape "
                                 f"{shape}")
            return data.reshape(shape)
    names = ", ".join(repr(o.name) for o in response.outputs) or "none"
    raise UsageError(f"response has no output '{info.output_name}' (got {names})")


def answered_logits(response: pb.ModelInferResponse, request: pb.ModelInferRequest,
                    info: ModelInfo) -> np.ndarray:
    """The response's logits, checked to hold one row per image the request sent."""
    logits = logits_of(response, info)
    sent = int(request.inputs[0].shape[0])
    if logits.ndim != 2 or logits.shape[0] != sent:
        raise UsageError(f"model '{info.name}' answered {sent} images with logits of shape "
                         f"{list(logits.shape)}")
    return logits


# --- results -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Prediction:
    """One image's answer: the top-k classes, most probable first."""

    labels: tuple[str, ...]
    class_ids: tuple[int, ...]
    probabilities: tuple[float, ...]  # softmax of the logits, for the same classes
    logits: np.ndarray | None = None  # all classes, when asked for (return_logits=True)

    @property
    def label(self) -> str:
        return self.labels[0]

    @property
    def class_id(self) -> int:
        return self.class_ids[0]

    @property
    def probability(self) -> float:
        return self.probabilities[0]

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "top": [{"label": lb, "class_id": c, "probability": p}
                    for lb, c, p in zip(self.labels, self.class_ids, self.probabilities)]}
        if self.logits is not None:
            data["logits"] = [float(v) for v in self.logits]
        return data


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64) - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def check_top_k(top_k: int, info: ModelInfo) -> int:
    if top_k < 1:
        raise UsageError(f"top_k must be at least 1, got {top_k}")
    return min(top_k, info.num_classes or top_k)


def predictions(logits: np.ndarray, info: ModelInfo, top_k: int,
                return_logits: bool) -> list[Prediction]:
    probs = softmax(logits)
    order = np.argsort(-probs, axis=-1, kind="stable")[:, :top_k]
    names = info.class_names
    out = []
    for row, idx in enumerate(order):
        ids = tuple(int(i) for i in idx)
        out.append(Prediction(
            labels=tuple(names[i] if i < len(names) else str(i) for i in ids), class_ids=ids,
            probabilities=tuple(float(probs[row, i]) for i in ids),
            logits=logits[row].copy() if return_logits else None))
    return out
