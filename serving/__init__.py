"""Serving side of the project: the TensorFlow Serving-compatible model server (`serving.modelserver`)
and the configuration files both servers start from (`serving/config/`)."""
