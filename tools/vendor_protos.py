"""Regenerate client/protos/: TensorFlow Serving's generated protobuf and gRPC modules, without TensorFlow.

`tensorflow-serving-api` imports `tensorflow.core.framework...`, which loads the whole TensorFlow runtime
(about 1 GB of memory and seconds of start-up) just to get message classes. The gateway and the client
need only the messages, so we copy the generated modules (Apache 2.0, © Google) under `client.protos`,
rewriting their imports. The serialized descriptors are byte-for-byte the originals, so the wire format is
identical and both copies can live in one process.

Run in an environment with tensorflow and tensorflow-serving-api installed:
    python tools/vendor_protos.py
"""

from __future__ import annotations

import importlib.util
import re
import shutil
from pathlib import Path

ROOTS = [
    "tensorflow_serving.apis.prediction_service_pb2_grpc",
    "tensorflow_serving.apis.model_service_pb2_grpc",
    "tensorflow_serving.apis.prediction_log_pb2",
    "tensorflow_serving.config.model_server_config_pb2",
]
PREFIXES = ("tensorflow", "tensorflow_serving", "tsl", "xla")
IMPORT = re.compile(rf"^from ((?:{'|'.join(PREFIXES)})(?:\.\w+)*) import (\w+|\*)", re.M)
TARGET = Path(__file__).resolve().parent.parent / "client" / "protos"
PACKAGE = "client.protos"


def module_file(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None:
        raise SystemExit(f"cannot find {name}: install tensorflow and tensorflow-serving-api")
    return Path(spec.origin)


def rewrite(source: str) -> str:
    source = IMPORT.sub(lambda m: f"from {PACKAGE}.{m.group(1)} import {m.group(2)}", source)
    return re.sub(r"(BuildTopDescriptorsAndMessages\(DESCRIPTOR, ')", rf"\1{PACKAGE}.", source)


def main() -> None:
    if TARGET.exists():
        shutil.rmtree(TARGET)
    seen: set[str] = set()
    todo = list(ROOTS)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        source = module_file(name).read_text()
        todo += [pkg if mod == "*" else f"{pkg}.{mod}" for pkg, mod in IMPORT.findall(source)]
        out = TARGET.joinpath(*name.split(".")).with_suffix(".py")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(rewrite(source))
    for folder in [TARGET, *[p for p in TARGET.rglob("*") if p.is_dir()]]:
        (folder / "__init__.py").touch()
    (TARGET / "__init__.py").write_text(
        '"""TensorFlow Serving\'s generated protobuf/gRPC modules without TensorFlow; see tools/vendor_protos.py."""\n'
    )
    print(f"wrote {len(seen)} modules to {TARGET}")


if __name__ == "__main__":
    main()
