"""`python -m client` against a real gateway and model server (versions 1 and 2, stable -> 1, canary -> 2):
output, both transports and signatures, and the exit codes scripts rely on."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import ROOT, free_port
from test_gateway_servers import Gateway, start_labelled_server

from client import cli
from client.contract import CLASS_NAMES

CHECK = sorted((ROOT / "serving" / "deploy_check").glob("*.png"))


@pytest.fixture(scope="module")
def stack(tmp_path_factory, exported_model):
    tmp = tmp_path_factory.mktemp("cli")
    server = start_labelled_server(tmp, exported_model)
    gateway = Gateway({"GATEWAY_MODEL_SERVER": server.target})
    try:
        gateway.start(tmp)
        yield ["--gateway", gateway.url, "--model-server", server.target]
    finally:
        gateway.stop()
        server.stop()


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    code = cli.main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_classify_rest_json(stack, capsys):
    code, out, _ = run_cli(capsys, "classify", *map(str, CHECK[:3]), *stack, "--json", "--top-k", "2",
                           "--label", "canary")
    assert code == 0
    body = json.loads(out)
    assert body["version"] == 2 and len(body["predictions"]) == 3
    assert body["predictions"][0]["filename"] == CHECK[0].name
    assert all(len(p["top"]) == 2 and p["top"][0]["class"] in CLASS_NAMES for p in body["predictions"])


def test_grpc_pixels_bytes_and_rest_agree(stack, capsys):
    answers = {}
    for name, extra in {"rest": [], "pixels": ["--via", "grpc"],
                        "bytes": ["--via", "grpc", "--signature", "bytes"]}.items():
        code, out, err = run_cli(capsys, "classify", *map(str, CHECK), *stack, "--json", "--all-probabilities",
                                 "--version", "1", *extra)
        assert code == 0, err
        answers[name] = json.loads(out)
    for name, body in answers.items():
        assert body["version"] == 1, name
        assert [p["filename"] for p in body["predictions"]] == [p.name for p in CHECK]
    for a, b, tol in (("rest", "pixels", 1e-5), ("pixels", "bytes", 0.02)):
        for pa, pb in zip(answers[a]["predictions"], answers[b]["predictions"], strict=True):
            for c in CLASS_NAMES:
                assert abs(pa["probabilities"][c] - pb["probabilities"][c]) <= tol, (a, b, c)


def test_human_output(stack, capsys):
    code, out, _ = run_cli(capsys, "classify", str(CHECK[0]), *stack)
    assert code == 0
    first, second = out.splitlines()
    assert first.startswith("model cifar10 version ")
    assert second.startswith(CHECK[0].name) and any(c in second for c in CLASS_NAMES)


@pytest.mark.parametrize("via", ["rest", "grpc"])
def test_status(stack, capsys, via):
    code, out, err = run_cli(capsys, "status", *stack, "--via", via, "--json")
    assert code == 0, err
    versions = {v["version"]: v for v in json.loads(out)["versions"]}
    assert versions[1]["state"] == versions[2]["state"] == "AVAILABLE"
    assert versions[1]["labels"] == ["stable"] and versions[2]["labels"] == ["canary"]
    code, out, _ = run_cli(capsys, "status", *stack, "--via", via)
    assert code == 0 and "AVAILABLE" in out and "canary" in out


@pytest.mark.parametrize("via", ["rest", "grpc"])
def test_exit_codes(stack, capsys, tmp_path, via):
    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    common = [*stack, "--via", via]
    assert run_cli(capsys, "classify", str(bad), *common)[0] == cli.EXIT_IMAGE
    assert run_cli(capsys, "classify", str(tmp_path / "missing.png"), *common)[0] == cli.EXIT_IMAGE
    assert run_cli(capsys, "classify", str(CHECK[0]), *common, "--label", "gold")[0] == cli.EXIT_REFUSED
    assert run_cli(capsys, "classify", str(CHECK[0]), *common, "--version", "9")[0] == cli.EXIT_REFUSED
    assert run_cli(capsys, "classify", str(CHECK[0]), *common, "--top-k", "11")[0] == cli.EXIT_USAGE
    down = ["--gateway", f"http://127.0.0.1:{free_port()}", "--model-server", f"127.0.0.1:{free_port()}",
            "--via", via, "--timeout", "2"]
    code, _, err = run_cli(capsys, "classify", str(CHECK[0]), *down)
    assert code == cli.EXIT_SERVER and "error:" in err
    assert run_cli(capsys, "status", *down)[0] == cli.EXIT_SERVER


def test_python_dash_m_client_usage_error_and_run(stack):
    usage = subprocess.run([sys.executable, "-m", "client", "classify", str(CHECK[0]), "--version", "1",
                            "--label", "stable"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert usage.returncode == 2 and "not allowed with" in usage.stderr
    ok = subprocess.run([sys.executable, "-m", "client", "classify", str(CHECK[0]), *stack, "--json"],
                        cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["version"] in (1, 2)
