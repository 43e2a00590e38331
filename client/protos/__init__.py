"""TensorFlow Serving's generated protobuf/gRPC modules without TensorFlow; see tools/vendor_protos.py."""
