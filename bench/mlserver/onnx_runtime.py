"""An ONNX Runtime model for Seldon MLServer (bench/serve_rest.py): MLServer ships no ONNX runtime,
so this is its documented custom-runtime route (an MLModel subclass named in model-settings.json),
kept as plain as MLServer's own runtimes: decode the V2 input with NumpyCodec, run the session,
encode the output. MLServer's adaptive batching (max_batch_size/max_batch_time in the settings)
merges requests before predict sees them."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse
from mlserver.utils import get_model_uri


class OnnxModel(MLModel):
    async def load(self) -> bool:
        path = await get_model_uri(self._settings)
        self._session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        self._input = self._session.get_inputs()[0].name
        self._output = self._session.get_outputs()[0].name
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        x = NumpyCodec.decode_input(payload.inputs[0]).astype(np.float32, copy=False)
        y = self._session.run([self._output], {self._input: x})[0]
        return InferenceResponse(model_name=self.name, id=payload.id,
                                 outputs=[NumpyCodec.encode_output(self._output, y)])
