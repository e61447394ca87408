"""serverless.yml under the real Serverless Framework v3 (`npx --yes serverless@3`), offline and
without AWS credentials: `print` resolves the config and `package` builds the .zip and the
CloudFormation template.  Both run in a temporary copy laid out like build/lambda (what
scripts/build-lambda stages): the code, plus a stand-in dependency and model, plus files the
package must leave out.  The HTTP API routes must be exactly the app's routes."""

import json
import os
import shutil
import subprocess
import zipfile

import pytest

from conftest import ROOT

MODEL_FILE = "edge-home/smollm2-135m-instruct.int8.edge"
LEFT_OUT = ["tests/test_server.py", "numpy/tests/test_core.py", "core/kernels/_matmul.pyx",
            "core/kernels/_matmul.c", "edge/__pycache__/app.cpython-311.pyc", "serverless.yml"]


def serverless(*args: str, cwd) -> str:
    """Run `npx --yes serverless@3 ARGS` with no AWS credentials anywhere; its stdout."""
    if shutil.which("npx") is None:
        pytest.fail("npx is not on PATH: the Serverless Framework tests need Node.js 18+ with npm")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "EDGE_"))}
    env.update(SLS_TELEMETRY_DISABLED="1", SLS_NOTIFICATIONS_MODE="off",
               AWS_SHARED_CREDENTIALS_FILE=str(cwd / "no-credentials"), AWS_CONFIG_FILE=str(cwd / "no-config"))
    proc = subprocess.run(["npx", "--yes", "serverless@3", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"serverless {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
    assert "Invalid configuration" not in proc.stderr, proc.stderr
    return proc.stdout


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    """A build/lambda look-alike: serverless.yml, edge/ core/ models/, a stand-in numpy and model,
    and files that must not be packaged."""
    root = tmp_path_factory.mktemp("service")
    shutil.copy(ROOT / "serverless.yml", root)
    for package in ("edge", "core", "models"):
        shutil.copytree(ROOT / package, root / package, ignore=shutil.ignore_patterns("__pycache__"))
    for path in ["numpy/__init__.py", MODEL_FILE, *LEFT_OUT]:
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).touch()
    return root


@pytest.fixture(scope="module")
def printed(service) -> dict:
    return json.loads(serverless("print", "--format", "json", cwd=service))


@pytest.fixture(scope="module")
def packaged(service):
    """(names in .serverless/edge.zip, the CloudFormation template's resources)."""
    serverless("package", cwd=service)
    with zipfile.ZipFile(service / ".serverless" / "edge.zip") as z:
        names = set(z.namelist())
    template = json.loads((service / ".serverless" / "cloudformation-template-update-stack.json").read_text())
    return names, template["Resources"]


def app_routes() -> set[str]:
    from edge.app import create_app
    from edge.settings import Settings
    return {f"{r.method} {r.resource.canonical}" for r in create_app(Settings(models=[])).router.routes()
            if r.method != "HEAD"}


def test_print_resolves_the_config(printed):
    assert printed["service"] == "edge"
    provider = printed["provider"]
    assert (provider["name"], provider["runtime"], provider["architecture"]) == ("aws", "python3.11", "x86_64")
    assert provider["environment"]["EDGE_HOME"] == "/var/task/edge-home"
    assert provider["environment"]["EDGE_THREADS"] == "2"
    api = printed["functions"]["api"]
    assert api["handler"] == "edge/lambda_handler.handler"
    assert {e["httpApi"] for e in api["events"]} == app_routes()


def test_package_holds_code_dependencies_and_models_at_the_root(packaged):
    names, _ = packaged
    assert {"edge/lambda_handler.py", "edge/app.py", "core/kernels/__init__.py", "models/api.py",
            "numpy/__init__.py", MODEL_FILE} <= names
    assert not names & set(LEFT_OUT)


def test_template_routes_every_app_route_to_the_function(packaged):
    _, resources = packaged
    [function] = [r["Properties"] for r in resources.values() if r["Type"] == "AWS::Lambda::Function"]
    assert function["Handler"] == "edge/lambda_handler.handler" and function["Runtime"] == "python3.11"
    assert function["Timeout"] < 30, "an HTTP API integration gives up after 30 s"
    [integration] = [r["Properties"] for r in resources.values() if r["Type"] == "AWS::ApiGatewayV2::Integration"]
    assert integration["PayloadFormatVersion"] == "2.0"
    routes = {r["Properties"]["RouteKey"] for r in resources.values() if r["Type"] == "AWS::ApiGatewayV2::Route"}
    assert routes == app_routes()
