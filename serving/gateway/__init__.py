"""The public HTTP gateway: FastAPI in front of a TensorFlow Serving model server (SPEC section 8).

Run with `python -m serving.gateway`; configuration comes from GATEWAY_* environment variables
(serving/gateway/settings.py). The gateway needs only the protocol messages (client.protos), never the
TensorFlow runtime.
"""
