"""Drive a histosynth server with the stock ``tritonclient.grpc`` and print what it saw as JSON.

Run as a separate process by test_kserve_v2.py: tritonclient registers the protocol's
``inference.*`` messages in protobuf's default descriptor pool, as does our own generated
module, so the two cannot share one interpreter. A separate process is also the honest
test of wire compatibility: the client knows nothing of our .proto.

Usage: python tritonclient_probe.py '{"url": "127.0.0.1:1234", "model": "m", "input": "x.npy", "output": "y.npy"}'
"""

from __future__ import annotations

import json
import sys
from typing import Any

import numpy as np
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException


def failure(call: Any) -> dict[str, str] | None:
    """The status and message of a call expected to fail (None if it succeeded)."""
    try:
        call()
    except InferenceServerException as error:
        return {"status": str(error.status()), "message": str(error.message())}
    return None


def main() -> None:
    args = json.loads(sys.argv[1])
    client = triton.InferenceServerClient(url=args["url"])
    model = args["model"]
    result: dict[str, Any] = {
        "live": client.is_server_live(),
        "ready": client.is_server_ready(),
        "server": client.get_server_metadata(as_json=True),
        "index": client.get_model_repository_index(as_json=True).get("models", []),
        "model_ready": client.is_model_ready(model),
        "unknown_model_ready": client.is_model_ready("no-such-model"),
        "metadata": client.get_model_metadata(model, as_json=True),
    }
    input_meta = result["metadata"]["inputs"][0]
    output_meta = result["metadata"]["outputs"][0]
    data = np.load(args["input"])
    infer_input = triton.InferInput(input_meta["name"], list(data.shape), input_meta["datatype"])
    infer_input.set_data_from_numpy(data)
    response = client.infer(model, [infer_input], outputs=[triton.InferRequestedOutput(output_meta["name"])],
                            request_id="probe-1")
    np.save(args["output"], response.as_numpy(output_meta["name"]))
    result["response"] = response.get_response(as_json=True)
    result["response"].pop("raw_output_contents", None)

    wrong_type = triton.InferInput(input_meta["name"], list(data.shape), "UINT8")
    wrong_type.set_data_from_numpy(data.astype(np.uint8))
    result["wrong_datatype"] = failure(lambda: client.infer(model, [wrong_type]))
    wrong_rank = triton.InferInput(input_meta["name"], list(data.shape[1:]), input_meta["datatype"])
    wrong_rank.set_data_from_numpy(data[0])
    result["wrong_rank"] = failure(lambda: client.infer(model, [wrong_rank]))
    result["unknown_model"] = failure(lambda: client.infer("no-such-model", [infer_input]))
    result["unknown_metadata"] = failure(lambda: client.get_model_metadata("no-such-model"))
    result["unimplemented"] = failure(lambda: client.get_system_shared_memory_status())
    # Served for perf_analyzer: the model configuration and its statistics, in Triton's JSON shapes.
    result["config"] = client.get_model_config(model, as_json=True)["config"]
    result["statistics"] = client.get_inference_statistics(model, as_json=True)["model_stats"]
    result["unknown_statistics"] = failure(lambda: client.get_inference_statistics("no-such-model"))
    # The server must still answer after the failures.
    again = client.infer(model, [infer_input])
    result["infer_after_errors_equal"] = bool(
        np.array_equal(again.as_numpy(output_meta["name"]), np.load(args["output"]))
    )
    client.close()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
