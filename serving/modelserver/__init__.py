"""An embedded model server that speaks TensorFlow Serving's gRPC and REST API (see docs/modelserver.md).

`python -m serving.modelserver` takes tensorflow_model_server's flags; `python -m serving.modelserver.launch`
runs the real binary when it is on PATH and this server otherwise.
"""
