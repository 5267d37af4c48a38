"""``api.ray_serve`` on a local two-node Ray cluster: the same answers as uvicorn, through Ray's HTTP proxy.

Needs the ``ray`` extra (``pip install 'oodforge[ray]'``; ``make test`` installs it). The cluster is
``ray.cluster_utils.Cluster``: a head node and a second node, one CPU each, so the two replicas of one
CPU each can only run one per node.
"""

from __future__ import annotations

import base64

import httpx
import numpy as np
import pytest
from serving import detectors_dir, digit_like, free_port, png_bytes, running_server
from test_api import BAD_INPUTS, limits_env

pytest.importorskip(
    "ray.serve", reason="Ray Serve is not installed: pip install 'oodforge[ray]' (make test installs it)"
)
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def both(ood_assets, tmp_path_factory):
    """(uvicorn URL, Ray Serve URL) serving the same detectors with the same settings."""
    import ray
    from ray.cluster_utils import Cluster

    from api import ray_serve
    from api.settings import load_settings

    root = detectors_dir(
        tmp_path_factory.mktemp("ray"), {"tiny": ood_assets.ce, "teacher": ood_assets.teacher}
    )
    env = limits_env(root)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    cluster.add_node(num_cpus=1)
    ray.init(address=cluster.address)
    port = free_port()
    try:
        ray_serve.run(load_settings(environ=env), replicas=2, cpus_per_replica=1, port=port)
        assert len([n for n in ray.nodes() if n["Alive"]]) == 2
        assert ray.available_resources().get("CPU", 0) == 0  # both nodes' CPU taken: one replica on each
        with running_server(env, tmp_path_factory.mktemp("logs") / "uvicorn.log") as server:
            yield server.url, f"http://127.0.0.1:{port}"
    finally:
        ray_serve.shutdown()
        ray.shutdown()
        cluster.shutdown()


def test_scores_and_v2_match_uvicorn(both):
    uvicorn_url, ray_url = both
    images = [png_bytes(digit_like(i, size)) for i, size in enumerate((28, 32, 47, 28, 64, 20))]
    files = [("files", (f"{i}.png", data)) for i, data in enumerate(images[:4])]
    oip = {"inputs": [{"name": "image", "shape": [2], "datatype": "BYTES",
                       "data": [base64.b64encode(d).decode() for d in images[4:]]}],
           "parameters": {"binary_data_output": False}}  # fmt: skip
    answers = {}
    for url in both:
        with httpx.Client(base_url=url, timeout=60) as client:
            score = client.post("/score", files=files)
            infer = client.post("/v2/models/tiny/infer", json=oip)
            assert score.status_code == 200 and infer.status_code == 200, (url, score.text, infer.text)
            answers[url] = (score.json()["results"], infer.json()["outputs"])
    assert answers[ray_url] == answers[uvicorn_url]
    assert len(answers[ray_url][0]) == 4 and all(np.isfinite(r["score"]) for r in answers[ray_url][0])


def test_health_and_metrics_answer_through_the_proxy(both):
    _, ray_url = both
    with httpx.Client(base_url=ray_url, timeout=30) as client:
        assert client.get("/readyz").status_code == 200
        assert client.get("/v2/health/ready").status_code == 200
        assert client.get("/v2/models/teacher/ready").status_code == 200
        metrics = client.get("/metrics")
        assert metrics.status_code == 200 and "oodforge_" in metrics.text


def test_the_hostile_matrix_gets_the_same_4xx(both):
    uvicorn_url, ray_url = both
    with (
        httpx.Client(base_url=uvicorn_url, timeout=30) as plain,
        httpx.Client(base_url=ray_url, timeout=30) as ray,
    ):
        for case, (request, status, message) in BAD_INPUTS.items():
            expected, got = plain.post("/score", **request), ray.post("/score", **request)
            assert expected.status_code == status, case
            assert (got.status_code, got.json()) == (status, expected.json()), case
            assert message in got.json()["detail"], case
