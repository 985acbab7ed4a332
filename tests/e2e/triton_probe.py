"""Run tritonclient.grpc against a server and print what it got, as JSON (one process per probe).

A helper for tests/e2e/test_serve_tritonclient.py, run as a subprocess: tritonclient's stubs and
cnnctl's define the same protobuf names and cannot share one Python process.
Usage: python triton_probe.py URL MODEL INPUT.npy [infer|shm|stream]
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


def shared_memory(url: str, model: str, input_path: str) -> None:
    """Triton's system shared-memory extension through tritonclient: the input read from and the
    output written to POSIX shared memory that this process created."""
    import os
    from multiprocessing import shared_memory as sm

    x = np.load(input_path).astype("<f4")
    n_out = x.shape[0] * 10 * 4
    tag = f"cnnctl_probe_{os.getpid()}"
    shm_in = sm.SharedMemory(name=f"{tag}_in", create=True, size=x.nbytes)
    shm_out = sm.SharedMemory(name=f"{tag}_out", create=True, size=n_out)
    client = tg.InferenceServerClient(url)
    try:
        extensions = client.get_server_metadata(as_json=True)["extensions"]
        np.ndarray(x.shape, "<f4", buffer=shm_in.buf)[...] = x
        client.register_system_shared_memory("probe_in", f"/{tag}_in", x.nbytes)
        client.register_system_shared_memory("probe_out", f"/{tag}_out", n_out)
        status = client.get_system_shared_memory_status(as_json=True)
        inp = tg.InferInput("input", list(x.shape), "FP32")
        inp.set_shared_memory("probe_in", x.nbytes)
        out = tg.InferRequestedOutput("logits")
        out.set_shared_memory("probe_out", n_out)
        result = client.infer(model, [inp], outputs=[out])
        response = result.get_response(as_json=True)
        logits = np.ndarray((x.shape[0], 10), "<f4", buffer=shm_out.buf).copy()
        errors = {}
        small = tg.InferRequestedOutput("logits")
        small.set_shared_memory("probe_out", 8)
        try:
            client.infer(model, [inp], outputs=[small])
        except tg.InferenceServerException as exc:
            errors["output_too_small"] = [exc.status(), exc.message()]
        client.unregister_system_shared_memory()
        after = client.get_system_shared_memory_status(as_json=True)
    finally:
        client.close()
        for shm in (shm_in, shm_out):
            shm.close()
            shm.unlink()
    print(json.dumps({
        "extensions": extensions,
        "status": status, "after": after, "response": response, "errors": errors,
        "logits": base64.b64encode(logits.tobytes()).decode(), "logits_shape": list(logits.shape),
    }))


def stream(url: str, model: str, input_path: str) -> None:
    """ModelStreamInfer through tritonclient: one request per row of the input, then one of the
    wrong shape, on one stream; the answers as the callback got them."""
    import queue

    x = np.load(input_path).astype("<f4")
    answers: queue.Queue = queue.Queue()
    client = tg.InferenceServerClient(url)
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    for i in range(len(x)):
        inp = tg.InferInput("input", [1, *x.shape[1:]], "FP32")
        inp.set_data_from_numpy(x[i:i + 1])
        client.async_stream_infer(model, [inp], request_id=f"row-{i}")
    bad = tg.InferInput("input", [1, 1, 28, 28], "FP32")
    bad.set_data_from_numpy(np.zeros((1, 1, 28, 28), "<f4"))
    client.async_stream_infer(model, [bad], request_id="bad")
    got, errors = {}, []
    for _ in range(len(x) + 1):
        result, error = answers.get(timeout=60)
        if error is not None:
            errors.append(error.message())
        else:
            logits = result.as_numpy("logits")
            got[result.get_response().id] = base64.b64encode(logits.tobytes()).decode()
    client.stop_stream()
    client.close()
    print(json.dumps({"logits": got, "errors": errors}))


def control(url: str, model: str, input_path: str) -> None:
    """Model control through tritonclient: the index, load_model, requests queued (the server
    holds batches for --max-queue-delay-ms) when unload_model is called, the index after, a
    reload, and the errors of a model the repository does not hold."""
    import threading
    import time

    x = np.load(input_path).astype("<f4")
    client = tg.InferenceServerClient(url)
    out: dict = {"index_before": client.get_model_repository_index(as_json=True)}
    out["ready_before"] = client.is_model_ready(model)
    start = time.monotonic()
    client.load_model(model)
    out["load_s"] = time.monotonic() - start
    out["ready_loaded"] = client.is_model_ready(model)
    out["server_ready_loaded"] = client.is_server_ready()
    answers: list = []
    done = threading.Event()

    def answered(result, error) -> None:
        answers.append((time.monotonic(), result, error))
        if len(answers) == len(x):
            done.set()

    for i in range(len(x)):
        inp = tg.InferInput("input", [1, *x.shape[1:]], "FP32")
        inp.set_data_from_numpy(x[i:i + 1])
        client.async_infer(model, [inp], answered, request_id=f"q{i}")
    time.sleep(0.3)  # all sent; the server holds them for the queue delay
    out["answered_before_unload"] = len(answers)
    unload_at = time.monotonic()
    client.unload_model(model)
    unloaded_at = time.monotonic()
    done.wait(60)
    out["unload_s"] = unloaded_at - unload_at
    out["answers"] = [{"after_unload_began_s": t - unload_at, "id": r.get_response().id,
                       "logits": base64.b64encode(r.as_numpy("logits").tobytes()).decode()}
                      if e is None else {"error": e.message()} for t, r, e in answers]
    out["ready_unloaded"] = client.is_model_ready(model)
    out["index_unloaded"] = client.get_model_repository_index(as_json=True)
    inp = tg.InferInput("input", [1, *x.shape[1:]], "FP32")
    inp.set_data_from_numpy(x[:1])
    errors = {}
    try:
        client.infer(model, [inp])
    except tg.InferenceServerException as exc:
        errors["infer_unloaded"] = [exc.status(), exc.message()]
    try:
        client.load_model("no-such-model")
    except tg.InferenceServerException as exc:
        errors["load_unknown"] = [exc.status(), exc.message()]
    client.load_model(model)
    out["ready_reloaded"] = client.is_model_ready(model)
    out["index_reloaded"] = client.get_model_repository_index(as_json=True)
    out["errors"] = errors
    client.close()
    print(json.dumps(out))


if __name__ == "__main__":
    {"infer": main, "shm": shared_memory, "stream": stream, "control": control}[sys.argv[4] if len(sys.argv) > 4 else "infer"](
        *sys.argv[1:4])
