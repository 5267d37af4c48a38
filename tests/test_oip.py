"""Open Inference Protocol v2 through the real ``tritonclient.http`` client against a running server,
and the tensor codec (:mod:`api.oip`) on its own."""

from __future__ import annotations

import base64
import json
import struct

import httpx
import numpy as np
import pytest
import torch
import tritonclient.http as triton
from serving import detectors_dir, digit_like, png_bytes, running_server
from tritonclient.utils import InferenceServerException

from api.images import InputError
from api.oip import Output, encode_response, parse_request
from oodforge.detector import Detector

KEY = "v2-test-key-0001"
MAX_FILES = 4


@pytest.fixture(scope="module")
def served(ood_assets, tmp_path_factory):
    root = tmp_path_factory.mktemp("oip")
    artifacts = {"tiny": ood_assets.ce, "dense": "tests/data/v1/dense"}
    detectors_dir(root / "dets", artifacts)
    env = {
        "OODFORGE_DETECTORS_DIR": str(root / "dets"),
        "OODFORGE_DEFAULT_DETECTOR": "tiny",
        "OODFORGE_LIMITS__MAX_FILES": str(MAX_FILES),
    }
    with running_server(env, root / "server.log") as server:
        detectors = {name: Detector.load(root / "dets" / name / "detector") for name in artifacts}
        yield server, triton.InferenceServerClient(server.url.removeprefix("http://")), detectors


@pytest.fixture(scope="module")
def secured(ood_assets, tmp_path_factory):
    root = detectors_dir(tmp_path_factory.mktemp("oip-secured"), {"tiny": ood_assets.ce})
    env = {"OODFORGE_DETECTORS_DIR": str(root), "OODFORGE_API_KEYS": KEY}
    with running_server(env, root / "server.log") as server:
        yield server, triton.InferenceServerClient(server.url.removeprefix("http://"))


def images_input(*files: bytes, binary: bool = True) -> triton.InferInput:
    tensor = triton.InferInput("image", [len(files)], "BYTES")
    values = list(files) if binary else [base64.b64encode(f) for f in files]
    tensor.set_data_from_numpy(np.array(values, dtype=object), binary_data=binary)
    return tensor


def pixels_input(array: np.ndarray, datatype: str, name: str | None = None) -> triton.InferInput:
    name = name or ("pixels_uint8" if datatype == "UINT8" else "pixels")
    tensor = triton.InferInput(name, list(array.shape), datatype)
    tensor.set_data_from_numpy(array)
    return tensor


def error_of(call) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as err:
        call()
    return err.value


PNG = png_bytes(digit_like(1))
JPEG = png_bytes(digit_like(2, 64), "JPEG", quality=90)


# ------------------------------------------------------------------ health and metadata


def test_health_and_server_metadata(served):
    server, client, _ = served
    assert client.is_server_live() and client.is_server_ready()
    meta = client.get_server_metadata()
    assert meta["name"] == "oodforge" and "binary_tensor_data" in meta["extensions"]
    live = httpx.get(f"{server.url}/v2/health/live")
    assert live.status_code == 200 and live.content == b""


def test_model_readiness_and_metadata(served):
    _, client, detectors = served
    assert client.is_model_ready("tiny") and client.is_model_ready("dense")
    assert not client.is_model_ready("nope")
    version = detectors["tiny"].spec.version
    assert client.is_model_ready("tiny", model_version=version)
    assert not client.is_model_ready("tiny", model_version="0" * 12)
    meta = client.get_model_metadata("tiny")
    assert (
        meta["name"] == "tiny" and meta["versions"] == [version] and meta["platform"] == "oodforge_classifier"
    )
    assert meta["inputs"] == [
        {"name": "image", "datatype": "BYTES", "shape": [-1]},
        {"name": "pixels", "datatype": "FP32", "shape": [-1, 3, 32, 32]},
        {"name": "pixels_uint8", "datatype": "UINT8", "shape": [-1, 3, 32, 32]},
    ]
    assert [(o["name"], o["datatype"], o["shape"]) for o in meta["outputs"]] == [
        ("score", "FP32", [-1]),
        ("is_ood", "BOOL", [-1]),
        ("label", "BYTES", [-1]),
        ("confidence", "FP32", [-1]),
    ]
    assert client.get_model_metadata("tiny", model_version=version) == meta
    dense = client.get_model_metadata("dense")
    assert [o["name"] for o in dense["outputs"]] == ["score", "is_ood"]  # no labels: no label outputs


# ------------------------------------------------------------------ inference


def test_png_and_jpeg_bytes_score_as_detector_predict(served):
    _, client, detectors = served
    expected = detectors["tiny"].predict([PNG, JPEG])
    result = client.infer("tiny", [images_input(PNG, JPEG)])
    np.testing.assert_array_equal(result.as_numpy("score"), expected.scores.astype(np.float32))
    np.testing.assert_array_equal(result.as_numpy("is_ood"), expected.is_ood)
    assert [v.decode() for v in result.as_numpy("label")] == expected.label_names()
    np.testing.assert_allclose(result.as_numpy("confidence"), expected.confidences, rtol=1e-6)
    response = result.get_response()
    assert response["model_name"] == "tiny" and response["model_version"] == detectors["tiny"].spec.version
    assert response["parameters"]["threshold"] == pytest.approx(detectors["tiny"].threshold)
    assert all("binary_data_size" in o["parameters"] for o in response["outputs"])


def test_requested_outputs_as_json_or_binary_and_a_request_id(served):
    _, client, detectors = served
    outputs = [triton.InferRequestedOutput("label", binary_data=False), triton.InferRequestedOutput("score")]
    result = client.infer("tiny", [images_input(PNG)], outputs=outputs, request_id="req-7")
    response = result.get_response()
    assert response["id"] == "req-7" and [o["name"] for o in response["outputs"]] == ["label", "score"]
    label, score = response["outputs"]
    assert label["data"] == detectors["tiny"].predict([PNG]).label_names() and "data" not in score
    assert result.as_numpy("score")[0] == np.float32(detectors["tiny"].predict([PNG]).scores[0])


def test_json_bytes_elements_are_base64(served):
    _, client, detectors = served
    result = client.infer("tiny", [images_input(PNG, JPEG, binary=False)])
    np.testing.assert_array_equal(
        result.as_numpy("score"), detectors["tiny"].predict([PNG, JPEG]).scores.astype(np.float32)
    )


def test_uint8_and_fp32_pixel_tensors(served):
    _, client, detectors = served
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (3, 3, 32, 32), dtype=np.uint8)
    expected = detectors["tiny"].predict(torch.from_numpy(pixels)).scores.astype(np.float32)
    result = client.infer("tiny", [pixels_input(pixels, "UINT8")])
    np.testing.assert_array_equal(result.as_numpy("score"), expected)
    as_float = (pixels / 255.0).astype(np.float32)
    floats = client.infer("tiny", [pixels_input(as_float, "FP32")]).as_numpy("score")
    np.testing.assert_allclose(floats, expected, rtol=1e-5, atol=1e-5)


def _example(datatype: str, shape: list[int], rng: np.random.Generator) -> np.ndarray | list[bytes]:
    """Valid data for a metadata input: RGB pixels in its datatype's range, or encoded files for BYTES."""
    if datatype == "BYTES":
        return [PNG, JPEG]
    concrete = [2 if d == -1 else d for d in shape]
    values = rng.integers(0, 256, concrete, dtype=np.uint8)
    return values if datatype == "UINT8" else (values / 255.0).astype(triton.triton_to_np_dtype(datatype))


def test_model_metadata_lists_exactly_the_inputs_and_datatypes_infer_accepts(served):
    _, client, detectors = served
    rng = np.random.default_rng(5)
    inputs = client.get_model_metadata("tiny")["inputs"]
    for meta in inputs:  # a client that trusts the metadata: every declared input works as declared
        data = _example(meta["datatype"], meta["shape"], rng)
        if meta["datatype"] == "BYTES":
            tensor, expected = images_input(*data), detectors["tiny"].predict(data)
        else:
            tensor = pixels_input(data, meta["datatype"], meta["name"])
            as_uint8 = data if data.dtype == np.uint8 else np.round(data * 255).astype(np.uint8)
            expected = detectors["tiny"].predict(torch.from_numpy(as_uint8))
        scores = client.infer("tiny", [tensor]).as_numpy("score")
        np.testing.assert_allclose(scores, expected.scores.astype(np.float32), rtol=1e-5, atol=1e-5)
    declared = {(m["name"], m["datatype"]) for m in inputs}
    for name in ("pixels", "pixels_uint8"):  # and every other datatype on a pixel input is refused
        for datatype in ("FP32", "UINT8", "FP16", "INT32"):
            if (name, datatype) in declared:
                continue
            array = np.zeros((1, 3, 32, 32), triton.triton_to_np_dtype(datatype))
            tensor = pixels_input(array, datatype, name)
            err = error_of(lambda tensor=tensor: client.infer("tiny", [tensor]))
            assert err.status() == "400" and f"input {name!r} must be" in err.message()
            if datatype in ("FP32", "UINT8"):
                other = "pixels_uint8" if datatype == "UINT8" else "pixels"
                assert f"as the input {other!r}" in err.message()


def test_versioned_path_gzip_and_a_dense_model(served):
    _, client, detectors = served
    version = detectors["tiny"].spec.version
    scored = client.infer("tiny", [images_input(PNG)], model_version=version).as_numpy("score")
    gzipped = client.infer("tiny", [images_input(PNG)], request_compression_algorithm="gzip").as_numpy(
        "score"
    )
    assert scored[0] == gzipped[0] == np.float32(detectors["tiny"].predict([PNG]).scores[0])
    dense = client.infer("dense", [images_input(PNG)])
    assert dense.as_numpy("score")[0] == np.float32(detectors["dense"].predict([PNG]).scores[0])
    assert dense.as_numpy("label") is None


def test_content_type_parameter_is_honoured(served):
    server, _, detectors = served
    expected = float(np.float32(detectors["tiny"].predict([PNG]).scores[0]))

    def infer(content_type: str, data: bytes) -> httpx.Response:
        payload = {
            "inputs": [
                {
                    "name": "image",
                    "shape": [1],
                    "datatype": "BYTES",
                    "data": [base64.b64encode(data).decode()],
                }
            ]
        }
        payload["inputs"][0]["parameters"] = {"content_type": content_type}
        return httpx.post(f"{server.url}/v2/models/tiny/infer", json=payload)

    assert infer("image/png", PNG).json()["outputs"][0]["data"] == [expected]
    assert infer("image/*", PNG).status_code == 200
    refused = infer("image/png", JPEG)  # declared PNG, sent JPEG: only PNG is decoded
    assert refused.status_code == 415 and "content_type is 'image/png'" in refused.json()["error"]
    assert infer("text/csv", PNG).status_code == 415
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "image",
                    "shape": [1],
                    "datatype": "BYTES",
                    "parameters": {"content_type": "base64", "binary_data_size": 0},
                }
            ]
        }
    )
    text = base64.b64encode(PNG)
    element = struct.pack("<I", len(text)) + text
    header = header.replace('"binary_data_size": 0', f'"binary_data_size": {len(element)}').encode()
    response = httpx.post(
        f"{server.url}/v2/models/tiny/infer",
        content=header + element,
        headers={"Inference-Header-Content-Length": str(len(header))},
    )
    assert response.status_code == 200 and response.json()["outputs"][0]["data"] == [expected]


# ------------------------------------------------------------------ errors


def test_an_unknown_model_and_version_are_404(served):
    _, client, detectors = served
    err = error_of(lambda: client.infer("nope", [images_input(PNG)]))
    assert err.status() == "404" and "unknown model 'nope'" in err.message() and "tiny" in err.message()
    err = error_of(lambda: client.get_model_metadata("nope"))
    assert err.status() == "404"
    err = error_of(lambda: client.infer("tiny", [images_input(PNG)], model_version="0" * 12))
    assert err.status() == "404" and detectors["tiny"].spec.version in err.message()


@pytest.mark.parametrize(
    ("make", "status", "message"),
    [
        (lambda: [triton.InferInput("img", [1], "BYTES")], 400, "send exactly one input"),
        (lambda: [pixels_input(np.zeros((1, 3, 28, 28), np.uint8), "UINT8")], 400, "[-1, 3, 32, 32]"),
        (lambda: [pixels_input(np.full((1, 3, 32, 32), 2.0, np.float32), "FP32")], 400, "[0, 1]"),
        (lambda: [pixels_input(np.zeros((1, 3, 32, 32), np.int32), "INT32")], 400, "FP32"),
        (
            lambda: [pixels_input(np.zeros((1, 3, 32, 32), np.uint8), "UINT8", "pixels")],
            400,
            "'pixels_uint8'",
        ),
        (lambda: [images_input(b"plain text, no pixels")], 415, "not a recognised image"),
        (lambda: [images_input(PNG[:100])], 400, "truncated or corrupt"),
        (lambda: [images_input(*[PNG] * (MAX_FILES + 1))], 413, "above the limit of 4"),
    ],
)
def test_a_bad_input_gets_its_error(served, make, status, message):
    _, client, _ = served
    inputs = make()
    if inputs[0].name() == "img":
        inputs[0].set_data_from_numpy(np.array([PNG], dtype=object))
    err = error_of(lambda: client.infer("tiny", inputs))
    assert err.status() == str(status) and message in err.message()


def test_asking_a_dense_model_for_labels_is_400(served):
    _, client, _ = served
    err = error_of(
        lambda: client.infer("dense", [images_input(PNG)], outputs=[triton.InferRequestedOutput("label")])
    )
    assert err.status() == "400" and "has no output 'label'" in err.message()


@pytest.mark.parametrize(
    ("body", "headers", "status"),
    [
        (b"{not json", {}, 400),
        (b'{"inputs": "x"}', {}, 422),
        (b'{"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES"}]}', {}, 400),
        (b'{"inputs": []}', {"Inference-Header-Content-Length": "99999"}, 400),
        (b'{"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": [5]}]}', {}, 400),
        (b'{"inputs": [{"name": "image", "shape": [-1], "datatype": "BYTES", "data": []}]}', {}, 400),
        (b"\x1f\x8bnot really gzip", {"Content-Encoding": "gzip"}, 400),
        (b"{}", {"Content-Encoding": "br"}, 415),
    ],
)
def test_malformed_requests_are_4xx_in_the_protocol_form(served, body, headers, status):
    server, _, _ = served
    response = httpx.post(f"{server.url}/v2/models/tiny/infer", content=body, headers=headers)
    assert response.status_code == status and isinstance(response.json()["error"], str)


def test_unknown_v2_routes_answer_in_the_protocol_form(served):
    server, _, _ = served
    response = httpx.get(f"{server.url}/v2/repository/index")
    assert response.status_code == 404 and "/v2/models/{name}" in response.json()["error"]


def test_api_keys_guard_infer_and_metadata_but_not_health(secured):
    server, client = secured
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("tiny")
    for call in (
        lambda: client.infer("tiny", [images_input(PNG)]),
        lambda: client.get_model_metadata("tiny"),
        lambda: client.get_server_metadata(),
    ):
        err = error_of(call)
        assert err.status() == "401" and "API key" in err.message()
    headers = {"Authorization": f"Bearer {KEY}"}
    assert len(client.infer("tiny", [images_input(PNG)], headers=headers).as_numpy("score")) == 1
    assert client.get_model_metadata("tiny", headers=headers)["name"] == "tiny"
    assert KEY not in server.log_text()


def test_no_request_got_a_5xx(served):
    server, _, _ = served
    assert not [line for line in server.log_text().splitlines() if 'HTTP/1.1" 5' in line]


# ------------------------------------------------------------------ the codec on its own


def test_binary_requests_split_into_inputs_in_order():
    header = json.dumps(
        {
            "inputs": [
                {"name": "a", "shape": [2], "datatype": "UINT8", "parameters": {"binary_data_size": 2}},
                {"name": "b", "shape": [1], "datatype": "FP32", "data": [0.5]},
                {"name": "c", "shape": [1], "datatype": "FP32", "parameters": {"binary_data_size": 4}},
            ]
        }
    ).encode()
    body = header + b"\x01\x02" + struct.pack("<f", 0.25)
    request, raw = parse_request(body, str(len(header)))
    assert [t.name for t in request.inputs] == ["a", "b", "c"]
    assert raw == {"a": b"\x01\x02", "c": struct.pack("<f", 0.25)}
    for bad in (body + b"x", body[:-1]):
        with pytest.raises(InputError) as err:
            parse_request(bad, str(len(header)))
        assert err.value.status == 400


def test_binary_responses_carry_sizes_and_a_header_length():
    outputs = [
        Output("score", "FP32", np.array([1.5, -2.0], np.float32)),
        Output("is_ood", "BOOL", np.array([True, False])),
        Output("label", "BYTES", [b"3", b"cat"]),
    ]
    body, headers = encode_response({"model_name": "m"}, outputs, {"score": True, "label": True})
    split = int(headers["inference-header-content-length"])
    head = json.loads(body[:split])
    assert [o.get("parameters", {}).get("binary_data_size") for o in head["outputs"]] == [8, None, 12]
    assert head["outputs"][1]["data"] == [True, False]
    assert body[split:] == struct.pack("<ff", 1.5, -2.0) + b"\x01\x00\x00\x003\x03\x00\x00\x00cat"
    plain, plain_headers = encode_response({"model_name": "m"}, outputs, {})
    assert plain_headers["content-type"] == "application/json" and json.loads(plain)["outputs"][2][
        "data"
    ] == ["3", "cat"]
