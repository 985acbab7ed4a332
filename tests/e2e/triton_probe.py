"""Run tritonclient.grpc against a server and print what it got, as JSON (one process per probe).

A helper for tests/e2e/test_serve_tritonclient.py, run as a subprocess: tritonclient's stubs and
cnnctl's define the same protobuf names and cannot share one Python process.
Usage: python triton_probe.py URL MODEL INPUT.npy
"""

from __future__ import annotations

import base64
import json
import sys

import numpy as np
import tritonclient.grpc as tg


def main(url: str, model: str, input_path: str) -> None:
    x = np.load(input_path)
    client = tg.InferenceServerClient(url)
    meta = client.get_model_metadata(model, as_json=True)
    config = client.get_model_config(model, as_json=True)["config"]
    inp = tg.InferInput(meta["inputs"][0]["name"], list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    result = client.infer(model, [inp], outputs=[tg.InferRequestedOutput("logits")],
                          request_id="probe-1")
    logits = result.as_numpy("logits")
    stats = client.get_inference_statistics(model, as_json=True)
    errors = {}
    try:
        client.infer("no-such-model", [inp])
    except tg.InferenceServerException as exc:
        errors["unknown_model"] = [exc.status(), exc.message()]
    print(json.dumps({
        "live": client.is_server_live(), "ready": client.is_server_ready(),
        "model_ready": client.is_model_ready(model), "server": client.get_server_metadata(as_json=True),
        "metadata": meta, "config": config, "stats": stats, "errors": errors,
        "id": result.get_response().id,
        "logits": base64.b64encode(logits.astype("<f4").tobytes()).decode(),
        "logits_shape": list(logits.shape),
    }))
    client.close()


if __name__ == "__main__":
    main(*sys.argv[1:4])
