"""The served-model contract (SPEC section 6): names shared by the exporter, the servers and the clients.

Pure constants: importing this module loads no TensorFlow.
"""

MODEL_NAME = "cifar10"
CLASS_NAMES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)
IMAGE_SIZE = 32

# serving_default: raw pixels.
DEFAULT_SIGNATURE = "serving_default"
PIXELS_INPUT = "images"  # uint8 [batch, 32, 32, 3], RGB

# The encoded-image signature: JPEG, PNG, GIF or BMP bytes, decoded and resized in the graph.
IMAGES_SIGNATURE = "predict_images"
BYTES_INPUT = "image_bytes"  # string [batch]

# Outputs of both signatures.
PROBABILITIES = "probabilities"  # float32 [batch, 10], columns in CLASS_NAMES order
CLASS_IDS = "class_ids"  # int64 [batch], the top-1 class index
CLASS_LABELS = "class_names"  # string [batch], the top-1 class name
CLASSES = "classes"  # string [batch, 10], the name of each probability column

WARMUP_FILE = "assets.extra/tf_serving_warmup_requests"
METADATA_FILE = "metadata.json"
