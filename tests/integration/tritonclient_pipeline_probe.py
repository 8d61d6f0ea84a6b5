"""Drive a histosynth pipeline model with the stock tritonclient (gRPC or HTTP) and print what it saw as JSON.

Run as a separate process by test_kserve_pipelines.py / test_kserve_rest.py (tritonclient.grpc's
``inference.*`` messages clash with ours in one interpreter; see tritonclient_probe.py). The client
knows nothing of our .proto or routes: this is the wire-compatibility test.

Usage: python tritonclient_pipeline_probe.py '{"protocol": "grpc" | "http", "url": "127.0.0.1:1234",
    "model": "m-pipeline", "inputs": {"class_masks": "mask.npy", ...}, "parameters": {"seed": 7},
    "outputs": ["images"], "output_dir": "dir"}'
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
from tritonclient.utils import np_to_triton_dtype
from tritonclient_probe import failure  # this script's directory is on sys.path when run as a script


def main() -> None:
    args = json.loads(sys.argv[1])
    if args["protocol"] == "grpc":
        import tritonclient.grpc as triton
    else:
        import tritonclient.http as triton
    client = triton.InferenceServerClient(url=args["url"])
    model = args["model"]

    def infer_inputs(arrays: dict[str, np.ndarray]) -> list[Any]:
        inputs = []
        for name, array in arrays.items():
            tensor = triton.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
            tensor.set_data_from_numpy(array)
            inputs.append(tensor)
        return inputs

    arrays = {name: np.load(path) for name, path in args["inputs"].items()}
    outputs = [triton.InferRequestedOutput(name) for name in args["outputs"]]
    result: dict[str, Any] = {
        "ready": client.is_server_ready(),
        "model_ready": client.is_model_ready(model),
        "metadata": client.get_model_metadata(model, as_json=True) if args["protocol"] == "grpc"
        else client.get_model_metadata(model),
        "index": client.get_model_repository_index(as_json=True)
        if args["protocol"] == "grpc" else client.get_model_repository_index(),
    }
    config = client.get_model_config(model, as_json=True) if args["protocol"] == "grpc" else client.get_model_config(model)
    result["config"] = config.get("config", config)  # gRPC wraps it in {"config": ...}, REST does not
    response = client.infer(model, infer_inputs(arrays), outputs=outputs, parameters=args["parameters"],
                            request_id="pipeline-1")
    out_dir = Path(args["output_dir"])
    for name in args["outputs"]:
        np.save(out_dir / f"{name}.npy", response.as_numpy(name))
    answer = response.get_response(as_json=True) if args["protocol"] == "grpc" else response.get_response()
    answer.pop("raw_output_contents", None)
    result["response"] = answer

    as_float = {name: array.astype(np.float32) for name, array in arrays.items()}
    result["wrong_datatype"] = failure(lambda: client.infer(model, infer_inputs(as_float)))
    result["unknown_parameter"] = failure(
        lambda: client.infer(model, infer_inputs(arrays), parameters={"sed": 1}))
    result["bad_parameter"] = failure(
        lambda: client.infer(model, infer_inputs(arrays), parameters={"seed": "seven"}))
    # The server still answers, with the same bytes.
    again = client.infer(model, infer_inputs(arrays), outputs=outputs, parameters=args["parameters"])
    result["again_equal"] = all(
        np.array_equal(again.as_numpy(name), np.load(out_dir / f"{name}.npy")) for name in args["outputs"]
    )
    client.close()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
