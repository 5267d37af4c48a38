"""docker/install.sh, the install steps shared by `make setup` and both Docker images.

The script runs for real against fake interpreters that log their arguments (no network, no install);
the Dockerfiles and compose.yaml are checked statically (no Docker engine here), and their HEALTHCHECK and
CMD commands are run against a local HTTP server and a fake uvicorn.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "docker" / "install.sh"
DOCKERFILES = ["Dockerfile", "Dockerfile.cuda"]
_DEFAULT = re.search(r"TORCH_SPEC=\$\{TORCH_SPEC:-(torch==\S+)\}", SCRIPT.read_text())
assert _DEFAULT, "docker/install.sh no longer sets TORCH_SPEC=${TORCH_SPEC:-torch==VERSION}"
DEFAULT_TORCH = _DEFAULT.group(1)  # the one copy of the default torch pin
PIP = ["-m", "pip", "install", "--quiet"]

# A fake interpreter: logs "ROLE<TAB>arg<TAB>arg..." per call. `-m venv DIR` makes DIR/bin/python a fake
# with ROLE=venv; `-c CODE` runs CODE on the real interpreter, with sys.version_info = FAKE_VERSION if set.
FAKE = r"""#!/bin/sh
ROLE=system
{ printf '%s' "$ROLE"; for arg in "$@"; do printf '\t%s' "$arg"; done; printf '\n'; } >>"$FAKE_LOG"
if [ "${1:-}" = -c ]; then
    if [ -n "${FAKE_VERSION:-}" ]; then
        exec "$REAL_PYTHON" -c "import sys; sys.version_info = tuple(map(int, '$FAKE_VERSION'.split('.'))); exec(sys.argv[1])" "$2"
    fi
    exec "$REAL_PYTHON" -c "$2"
fi
if [ "${1:-}" = -m ] && [ "${2:-}" = venv ]; then
    mkdir -p "$3/bin"
    sed 's/^ROLE=.*/ROLE=venv/' "$0" >"$3/bin/python"
    chmod +x "$3/bin/python"
fi
"""

Call = tuple[str, list[str]]


@dataclass(frozen=True)
class Fakes:
    bin: Path  # holds python3 (ROLE=system) and uvicorn (ROLE=uvicorn)
    log: Path

    def env(self, **extra: str) -> dict[str, str]:
        base = {"PATH": f"{self.bin}:/usr/bin:/bin", "FAKE_LOG": str(self.log), "REAL_PYTHON": sys.executable}
        return base | extra

    def calls(self) -> list[Call]:
        if not self.log.exists():
            return []
        rows = [line.split("\t") for line in self.log.read_text().splitlines()]
        return [(row[0], row[1:]) for row in rows]


@pytest.fixture
def fakes(tmp_path: Path) -> Fakes:
    bin_dir = tmp_path / "fakebin"
    bin_dir.mkdir()
    for name, role in [("python3", "system"), ("uvicorn", "uvicorn")]:
        (bin_dir / name).write_text(FAKE.replace("ROLE=system", f"ROLE={role}", 1))
        (bin_dir / name).chmod(0o755)
    return Fakes(bin=bin_dir, log=tmp_path / "calls.log")


def install(
    fakes: Fakes, venv: Path | str, cwd: Path, script: str = str(SCRIPT), **env: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["sh", script, str(venv)], cwd=cwd, env=fakes.env(**env), capture_output=True, text=True, timeout=60
    )


def pip_calls(calls: list[Call]) -> list[list[str]]:
    assert all(role == "venv" for role, args in calls if args[:2] == ["-m", "pip"])
    return [args[len(PIP) :] for role, args in calls if role == "venv"]


# --- docker/install.sh -------------------------------------------------------------------------------


def test_script_is_valid_posix_sh() -> None:
    subprocess.run(["sh", "-n", str(SCRIPT)], check=True, timeout=30)


def test_fresh_install_creates_venv_then_pip_torch_project(tmp_path: Path, fakes: Fakes) -> None:
    venv = tmp_path / "venv"
    result = install(fakes, venv, cwd=tmp_path)  # PYTHON unset: python3 from PATH
    assert result.returncode == 0, result.stderr
    calls = fakes.calls()
    assert [role for role, _ in calls[:2]] == ["system", "system"]
    assert calls[0][1][0] == "-c"  # the version check
    assert calls[1][1] == ["-m", "venv", str(venv)]
    assert all(args[: len(PIP)] == PIP for role, args in calls[2:])
    assert pip_calls(calls) == [["--upgrade", "pip"], [DEFAULT_TORCH], [str(REPO)]]
    assert (venv / "bin" / "python").exists()


def test_existing_venv_is_reused_without_python(tmp_path: Path, fakes: Fakes) -> None:
    venv = tmp_path / "venv"
    assert install(fakes, venv, cwd=tmp_path).returncode == 0
    fakes.log.unlink()
    result = install(fakes, venv, cwd=tmp_path, PYTHON=str(tmp_path / "no-such-python"))
    assert result.returncode == 0, result.stderr
    assert {role for role, _ in fakes.calls()} == {"venv"}  # no venv creation, no version check
    assert pip_calls(fakes.calls()) == [["--upgrade", "pip"], [DEFAULT_TORCH], [str(REPO)]]


def test_torch_spec_is_split_into_args_and_installed_before_the_project(tmp_path: Path, fakes: Fakes) -> None:
    spec = "torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
    result = install(fakes, tmp_path / "venv", cwd=tmp_path, TORCH_SPEC=spec, EXTRAS="gpu")
    assert result.returncode == 0, result.stderr
    assert pip_calls(fakes.calls())[1:] == [spec.split(), [f"{REPO}[gpu]"]]


@pytest.mark.parametrize(
    ("extras", "editable", "expected"),
    [
        ("dev", "1", ["-e", f"{REPO}[dev]"]),  # make setup
        ("", "1", ["-e", str(REPO)]),
        ("gpu", "0", [f"{REPO}[gpu]"]),  # Dockerfile.cuda
        ("dev,gpu", "", [f"{REPO}[dev,gpu]"]),  # empty EDITABLE = the default, 0
    ],
)
def test_extras_and_editable(
    tmp_path: Path, fakes: Fakes, extras: str, editable: str, expected: list[str]
) -> None:
    result = install(fakes, tmp_path / "venv", cwd=tmp_path, EXTRAS=extras, EDITABLE=editable)
    assert result.returncode == 0, result.stderr
    assert pip_calls(fakes.calls())[-1] == expected


def test_works_from_another_cwd_with_relative_paths(tmp_path: Path, fakes: Fakes) -> None:
    elsewhere = tmp_path / "somewhere" / "else"
    elsewhere.mkdir(parents=True)
    script = os.path.relpath(SCRIPT, elsewhere)
    result = install(fakes, "venv", cwd=elsewhere, script=script, PYTHON=str(fakes.bin / "python3"))
    assert result.returncode == 0, result.stderr
    assert (elsewhere / "venv" / "bin" / "python").exists()
    assert pip_calls(fakes.calls())[-1] == [str(REPO)]  # the repo root, not the cwd


def test_missing_python_fails_with_a_clear_message(tmp_path: Path, fakes: Fakes) -> None:
    missing = tmp_path / "no-such-python"
    result = install(fakes, tmp_path / "venv", cwd=tmp_path, PYTHON=str(missing))
    assert result.returncode != 0
    assert f"PYTHON='{missing}' was not found" in result.stderr and "3.10" in result.stderr
    assert not (tmp_path / "venv").exists() and fakes.calls() == []


def test_old_python_fails_before_creating_the_venv(tmp_path: Path, fakes: Fakes) -> None:
    result = install(fakes, tmp_path / "venv", cwd=tmp_path, FAKE_VERSION="3.9.18")
    assert result.returncode != 0
    assert "Python 3.9.18" in result.stderr and "3.10 or newer" in result.stderr
    assert [args[0] for _, args in fakes.calls()] == ["-c"] and not (tmp_path / "venv").exists()


@pytest.mark.parametrize(
    ("args", "env", "message"), [([], {}, "usage:"), (["v"], {"EDITABLE": "yes"}, "EDITABLE")]
)
def test_bad_usage_is_explained(
    tmp_path: Path, fakes: Fakes, args: list[str], env: dict, message: str
) -> None:
    result = subprocess.run(
        ["sh", str(SCRIPT), *args], cwd=tmp_path, env=fakes.env(**env), capture_output=True, text=True
    )
    assert result.returncode != 0 and message in result.stderr and fakes.calls() == []


# --- Makefile: `make setup` runs the same script -----------------------------------------------------

needs_make = pytest.mark.skipif(shutil.which("make") is None, reason="GNU make not installed")


def make(fakes: Fakes, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["make", "--no-print-directory", "-C", str(REPO), *args],
        env=fakes.env(),
        capture_output=True,
        text=True,
        timeout=60,
    )


@needs_make
def test_make_setup_runs_install_script_editable_with_dev(tmp_path: Path, fakes: Fakes) -> None:
    venv = tmp_path / "venv"
    args = [f"VENV={venv}", f"PYTHON={fakes.bin / 'python3'}", "setup"]
    result = make(fakes, *args)
    assert result.returncode == 0, result.stdout + result.stderr
    assert pip_calls(fakes.calls()) == [["--upgrade", "pip"], [DEFAULT_TORCH], ["-e", f"{REPO}[dev]"]]
    assert (venv / ".oodforge-installed").exists()
    n_calls = len(fakes.calls())
    assert make(fakes, *args).returncode == 0 and len(fakes.calls()) == n_calls  # the stamp is up to date


@needs_make
def test_make_passes_torch_spec_from_the_command_line(tmp_path: Path, fakes: Fakes) -> None:
    spec = "torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
    result = make(
        fakes, f"VENV={tmp_path / 'venv'}", f"PYTHON={fakes.bin / 'python3'}", f"TORCH_SPEC={spec}", "setup"
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert pip_calls(fakes.calls())[1] == spec.split()


@needs_make
def test_make_test_adds_the_ray_extra_through_the_script(tmp_path: Path, fakes: Fakes) -> None:
    result = make(fakes, "-n", f"VENV={tmp_path / 'v'}", "test")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    ray = next(i for i, line in enumerate(lines) if "EXTRAS='dev,ray'" in line)
    assert f"EDITABLE=1 PYTHON='python3' sh docker/install.sh {tmp_path / 'v'}" in lines[ray]
    assert ray < next(i for i, line in enumerate(lines) if "-m pytest" in line)  # installed before the tests


def test_makefile_stamp_depends_on_the_script() -> None:
    rule = re.search(r"^\$\(STAMP\):(.*)\n((?:\t.*\n)+)", (REPO / "Makefile").read_text(), re.MULTILINE)
    assert rule is not None
    assert {"pyproject.toml", "docker/install.sh"} <= set(rule.group(1).split())
    assert "sh docker/install.sh $(VENV)" in rule.group(2)


@needs_make
def test_make_serve_runs_the_launcher_with_the_serve_config(tmp_path: Path, fakes: Fakes) -> None:
    result = make(fakes, "-n", f"VENV={tmp_path / 'v'}", "PORT=9001", "serve")
    assert result.returncode == 0, result.stderr
    expected = f"OODFORGE_SERVE_CONFIG=configs/serve/demo.yaml {tmp_path / 'v'}/bin/python -m api"
    assert f"{expected} --host 127.0.0.1 --port 9001" in result.stdout


# --- Dockerfiles, their .dockerignore files and compose.yaml (static; no Docker engine here) -------------


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        keyword, _, args = (pending + stripped).partition(" ")
        out.append((keyword.upper(), args.strip()))
        pending = ""
    return out


def only(path: Path, keyword: str) -> str:
    found = [args for kw, args in instructions(path) if kw == keyword]
    assert len(found) == 1, f"{path.name}: expected one {keyword}, found {len(found)}"
    return found[0]


def ignore_patterns(dockerfile: Path) -> list[str]:
    lines = dockerfile.with_name(dockerfile.name + ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


@pytest.mark.parametrize("name", DOCKERFILES)
def test_dockerfile_installs_with_the_shared_script(name: str) -> None:
    path = REPO / "docker" / name
    runs = [args for kw, args in instructions(path) if kw == "RUN" and "docker/install.sh" in args]
    assert len(runs) == 1 and runs[0].endswith("sh docker/install.sh /opt/venv") and "EDITABLE=0" in runs[0]
    assert ("EXTRAS=gpu" if name.endswith("cuda") else "EXTRAS= ") in runs[0]
    torch = re.search(r'ARG TORCH_SPEC="(torch==\S+) --index-url (\S+)"', path.read_text())
    assert torch is not None and torch.group(1) == DEFAULT_TORCH  # same pin as the script's default
    assert torch.group(2).endswith("/cu128" if name.endswith("cuda") else "/cpu")
    sources = [src for kw, args in instructions(path) if kw == "COPY" for src in args.split()[:-1]]
    assert "docker/install.sh" in sources and "pyproject.toml" in sources
    ignored = ignore_patterns(path)
    for src in sources:
        assert (REPO / src).exists(), f"{name} copies {src}, which does not exist"
        parts = Path(src).parts
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        hits = [p for p in ignored if any(fnmatch.fnmatch(prefix, p) for prefix in prefixes)]
        assert not hits, f"{name} copies {src}, but {name}.dockerignore excludes it ({hits})"


@pytest.mark.parametrize("name", DOCKERFILES)
def test_dockerignore_keeps_local_state_out(name: str) -> None:
    required = {".venv", ".git", "runs", "generators", "outliers", "tests", "bench", "**/__pycache__"}
    assert required <= set(ignore_patterns(REPO / "docker" / name))
    assert ignore_patterns(REPO / "docker" / name) == ignore_patterns(REPO / "docker" / DOCKERFILES[0])


@pytest.mark.parametrize("name", DOCKERFILES)
def test_dockerfile_runs_uvicorn_as_non_root_with_healthcheck(name: str) -> None:
    path = REPO / "docker" / name
    users = [args for kw, args in instructions(path) if kw == "USER"]
    assert users and users[-1].split(":")[0] not in {"root", "0"}
    assert only(path, "EXPOSE") == "8000"
    env = " ".join(args for kw, args in instructions(path) if kw == "ENV")
    assert "OODFORGE_DETECTORS_DIR=/detectors" in env and "WORKERS=2" in env and "/opt/venv/bin" in env
    assert ("OODFORGE_DEVICE=cuda" in env) == name.endswith("cuda")
    assert "/healthz" in only(path, "HEALTHCHECK")
    assert "uvicorn api.app:app" in only(path, "CMD")


class _Health(BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:
        self.send_response(self.status if self.path == "/healthz" else 404)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def health_server() -> Iterator[ThreadingHTTPServer]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Health)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("name", DOCKERFILES)
def test_healthcheck_passes_on_200_and_fails_otherwise(name: str, health_server: ThreadingHTTPServer) -> None:
    argv = json.loads(only(REPO / "docker" / name, "HEALTHCHECK").split(" CMD ", 1)[1])
    assert argv[0] == "/opt/venv/bin/python"
    port = health_server.server_address[1]
    argv = [sys.executable, *(arg.replace("127.0.0.1:8000", f"127.0.0.1:{port}") for arg in argv[1:])]
    statuses = {}
    for status in (200, 500):
        _Health.status = status
        statuses[status] = subprocess.run(argv, capture_output=True, timeout=30).returncode
    _Health.status = 200
    assert statuses[200] == 0 and statuses[500] != 0


@pytest.mark.parametrize("name", DOCKERFILES)
def test_cmd_execs_uvicorn_with_workers_from_env(name: str, fakes: Fakes, tmp_path: Path) -> None:
    argv = json.loads(only(REPO / "docker" / name, "CMD"))
    assert argv[:2] == ["sh", "-c"] and "exec uvicorn" in argv[2]
    metrics_dir = tmp_path / "metrics"
    metrics_dir.mkdir()
    (metrics_dir / "counter_123.db").write_bytes(b"stale")  # left over from a previous container run
    env = fakes.env(WORKERS="3", PROMETHEUS_MULTIPROC_DIR=str(metrics_dir))
    result = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert metrics_dir.is_dir() and not any(metrics_dir.iterdir())  # fresh, empty multiprocess dir
    assert fakes.calls() == [
        ("uvicorn", ["api.app:app", "--host", "0.0.0.0", "--port", "8000", "--workers", "3"])
    ]


def test_compose_mounts_detectors_and_builds_both_images() -> None:
    compose = yaml.safe_load((REPO / "docker" / "compose.yaml").read_text())
    services = compose["services"]
    assert set(services) == {"oodforge-api", "oodforge-api-gpu"}
    for name, dockerfile in [
        ("oodforge-api", "docker/Dockerfile"),
        ("oodforge-api-gpu", "docker/Dockerfile.cuda"),
    ]:
        service = services[name]
        assert service["build"] == {"context": "..", "dockerfile": dockerfile}
        assert (REPO / "docker" / ".." / dockerfile).is_file()
        mounts = [volume.split(":") for volume in service["volumes"]]
        assert ["../runs", "/detectors", "ro"] in mounts
        assert service["ports"] == ["8000:8000"] and service["restart"] == "unless-stopped"
        assert service["environment"]["OODFORGE_DEFAULT_DETECTOR"] == "oal"
        assert service["environment"]["OODFORGE_API_KEYS"] == "${OODFORGE_API_KEYS:-}"
    assert "profiles" not in services["oodforge-api"] and services["oodforge-api-gpu"]["profiles"] == ["gpu"]
    devices = services["oodforge-api-gpu"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}]


def test_kserve_manifest_matches_the_image_and_the_app() -> None:
    """docker/kserve.yaml (no Kubernetes here): its port is the image's, its probes and env are the app's."""
    from api.app import create_app
    from api.settings import load_settings

    spec = yaml.safe_load((REPO / "docker" / "kserve.yaml").read_text())
    assert (spec["apiVersion"], spec["kind"]) == ("serving.kserve.io/v1beta1", "InferenceService")
    (container,) = spec["spec"]["predictor"]["containers"]
    assert container["name"] == "kserve-container"
    port = int(only(REPO / "docker" / "Dockerfile", "EXPOSE"))
    assert [p["containerPort"] for p in container["ports"]] == [port]
    paths = create_app(load_settings(environ={})).openapi()["paths"]
    routes = {path for path, methods in paths.items() if "get" in methods}
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["port"] == port and container[probe]["httpGet"]["path"] in routes
    env = {e["name"]: e.get("value", "placeholder") for e in container["env"]}
    settings = load_settings(environ=env)  # an unknown OODFORGE_* name would be a ConfigError
    assert str(settings.detectors_dir) == container["volumeMounts"][0]["mountPath"]
    assert "WORKERS" in env and "WORKERS" in only(REPO / "docker" / "Dockerfile", "CMD")
    assert set(container["resources"]) == {"requests", "limits"}
