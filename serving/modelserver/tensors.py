"""TensorProto ↔ numpy without TensorFlow, and the REST JSON tensor encoding of TF Serving (json_tensor.cc).

Kept TF-free and numpy-vectorised because it runs on the event loop for every request.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from typing import Any

import numpy as np

from client.protos.tensorflow.core.framework import tensor_pb2, tensor_shape_pb2, types_pb2
from serving.modelserver.errors import invalid

DT = types_pb2
NUMPY_DTYPE: dict[int, np.dtype] = {
    DT.DT_FLOAT: np.dtype(np.float32), DT.DT_DOUBLE: np.dtype(np.float64), DT.DT_INT32: np.dtype(np.int32),
    DT.DT_UINT8: np.dtype(np.uint8), DT.DT_INT16: np.dtype(np.int16), DT.DT_INT8: np.dtype(np.int8),
    DT.DT_INT64: np.dtype(np.int64), DT.DT_BOOL: np.dtype(np.bool_), DT.DT_UINT16: np.dtype(np.uint16),
    DT.DT_HALF: np.dtype(np.float16), DT.DT_UINT32: np.dtype(np.uint32), DT.DT_UINT64: np.dtype(np.uint64),
    DT.DT_STRING: np.dtype(object),
}
DTYPE_ENUM: dict[np.dtype, int] = {v: k for k, v in NUMPY_DTYPE.items()}
# tensorflow::DataTypeString names used in error texts.
DTYPE_NAME = {
    DT.DT_FLOAT: "float", DT.DT_DOUBLE: "double", DT.DT_INT32: "int32", DT.DT_UINT8: "uint8",
    DT.DT_INT16: "int16", DT.DT_INT8: "int8", DT.DT_INT64: "int64", DT.DT_BOOL: "bool", DT.DT_UINT16: "uint16",
    DT.DT_HALF: "half", DT.DT_UINT32: "uint32", DT.DT_UINT64: "uint64", DT.DT_STRING: "string",
}
# Which repeated field of TensorProto carries each dtype (Tensor::AsProtoField).
_FIELD = {
    DT.DT_FLOAT: "float_val", DT.DT_DOUBLE: "double_val", DT.DT_INT32: "int_val", DT.DT_UINT8: "int_val",
    DT.DT_INT16: "int_val", DT.DT_INT8: "int_val", DT.DT_UINT16: "int_val", DT.DT_INT64: "int64_val",
    DT.DT_BOOL: "bool_val", DT.DT_HALF: "half_val", DT.DT_UINT32: "uint32_val", DT.DT_UINT64: "uint64_val",
    DT.DT_STRING: "string_val",
}


def dtype_name(dtype: int) -> str:
    return DTYPE_NAME.get(dtype, types_pb2.DataType.Name(dtype) if dtype in types_pb2.DataType.values() else "?")


# --- TensorProto ---------------------------------------------------------------------------------------------

def proto_to_numpy(tp: tensor_pb2.TensorProto, alias: str) -> np.ndarray:
    """Tensor::FromProto: tensor_content or the typed field; fewer typed values than elements repeat the last."""
    np_dtype = NUMPY_DTYPE.get(tp.dtype)
    if np_dtype is None:
        raise invalid(f"tensor parsing error: {alias}")
    if tp.tensor_shape.unknown_rank:
        raise invalid(f"tensor parsing error: {alias}")
    shape = tuple(d.size for d in tp.tensor_shape.dim)
    if any(s < 0 for s in shape):
        raise invalid(f"tensor parsing error: {alias}")
    count = math.prod(shape)
    if tp.dtype == DT.DT_STRING:
        values = list(tp.string_val)
        if len(values) > count:
            raise invalid(f"tensor parsing error: {alias}")
        if len(values) < count:
            values += [values[-1] if values else b""] * (count - len(values))
        arr = np.empty(count, dtype=object)
        arr[:] = values
        return arr.reshape(shape)
    if tp.tensor_content:
        if len(tp.tensor_content) != count * np_dtype.itemsize:
            raise invalid(f"tensor parsing error: {alias}")
        return np.frombuffer(tp.tensor_content, dtype=np_dtype).reshape(shape)
    raw = getattr(tp, _FIELD[tp.dtype])
    n = len(raw)
    if n > count:
        raise invalid(f"tensor parsing error: {alias}")
    if tp.dtype == DT.DT_HALF:
        arr = np.asarray(raw, dtype=np.uint16).view(np.float16)
    else:
        arr = np.asarray(raw, dtype=np_dtype) if n else np.zeros(0, np_dtype)
    if n < count:
        arr = np.concatenate([arr, np.full(count - n, arr[-1] if n else 0, dtype=np_dtype)])
    return arr.reshape(shape)


def numpy_to_proto(arr: np.ndarray, tp: tensor_pb2.TensorProto) -> None:
    """Tensor::AsProtoField, as TF Serving's Predict answers: typed repeated fields, not tensor_content."""
    dtype = DTYPE_ENUM.get(arr.dtype) if arr.dtype != object else DT.DT_STRING
    if dtype is None:
        raise invalid(f"unsupported output dtype {arr.dtype}")
    tp.dtype = dtype
    tp.tensor_shape.dim.extend(tensor_shape_pb2.TensorShapeProto.Dim(size=s) for s in arr.shape)
    flat = arr.reshape(-1)
    if dtype == DT.DT_STRING:
        tp.string_val.extend(v if isinstance(v, bytes) else str(v).encode() for v in flat)
    elif dtype == DT.DT_HALF:
        tp.half_val.extend(flat.view(np.uint16).tolist())
    else:
        getattr(tp, _FIELD[dtype]).extend(flat.tolist())


# --- JSON → tensors (FillPredictRequestFromJson) ---------------------------------------------------------------

_RAPIDJSON_ERRORS = [
    ("Expecting value", "Invalid value."),
    ("Expecting property name enclosed in double quotes", "Missing a name for object member."),
    ("Expecting ':' delimiter", "Missing a colon after a name of object member."),
    ("Expecting ',' delimiter", "Missing a comma or '}' after an object member."),
    ("Unterminated string", "Missing a closing quotation mark in string."),
    ("Invalid control character", "Invalid encoding in string."),
    ("Invalid \\escape", "Invalid escape character in string."),
    ("Invalid \\uXXXX escape", "Incorrect hex digit after \\u escape in string."),
    ("Extra data", "The document root must not be followed by other values."),
]


def parse_json_body(body: bytes) -> Any:
    """rapidjson's messages for the common syntax errors, as TF Serving reports them."""
    if not body:
        raise invalid("JSON Parse error: The document is empty")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise invalid(f"JSON Parse error: Invalid encoding in string. at offset: {exc.start}") from None
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        if not text.strip():
            raise invalid("JSON Parse error: The document is empty") from None
        message = next((m for p, m in _RAPIDJSON_ERRORS if exc.msg.startswith(p)), exc.msg + ".")
        raise invalid(f"JSON Parse error: {message} at offset: {exc.pos}") from None
    except RecursionError:
        raise invalid("JSON Parse error: Invalid value. at offset: 0") from None
    if not isinstance(doc, dict):
        raise invalid(f"JSON Value: {json_value_str(doc)} Is not object")
    return doc


def json_type(v: Any) -> str:
    if v is None:
        return "Null"
    if v is True:
        return "True"
    if v is False:
        return "False"
    if isinstance(v, dict):
        return "Object"
    if isinstance(v, list):
        return "Array"
    if isinstance(v, str):
        return "String"
    return "Number"


def json_value_str(v: Any) -> str:
    """rapidjson PrettyWriter output, used only in error texts."""
    if isinstance(v, float):
        return format_float(v, double=True)
    return json.dumps(v, indent=4, ensure_ascii=False)


def is_b64(v: Any) -> bool:
    return isinstance(v, dict) and len(v) == 1 and isinstance(v.get("b64"), str)


def _type_error(v: Any, dtype: int) -> Exception:
    return invalid(f"JSON Value: {json_value_str(v)} Type: {json_type(v)} is not of expected type: {dtype_name(dtype)}")


_INT_RANGE = {  # rapidjson IsInt / IsInt64 / IsUint / IsUint64
    DT.DT_INT32: (-(2**31), 2**31 - 1), DT.DT_INT16: (-(2**31), 2**31 - 1), DT.DT_INT8: (-(2**31), 2**31 - 1),
    DT.DT_UINT8: (-(2**31), 2**31 - 1), DT.DT_UINT16: (-(2**31), 2**31 - 1), DT.DT_INT64: (-(2**63), 2**63 - 1),
    DT.DT_UINT32: (0, 2**32 - 1), DT.DT_UINT64: (0, 2**64 - 1),
}
_FLOAT_MAX_INT = {DT.DT_FLOAT: 2**24 - 1, DT.DT_DOUBLE: 2**53 - 1, DT.DT_HALF: 2**11 - 1}
_FLOAT_MAX = {DT.DT_FLOAT: float(np.finfo(np.float32).max), DT.DT_DOUBLE: float(np.finfo(np.float64).max),
              DT.DT_HALF: float(np.finfo(np.float16).max)}


def _scalar(v: Any, dtype: int) -> Any:
    """AddValueToTensor: one JSON leaf → a Python value of the tensor's dtype, or TF Serving's error."""
    if isinstance(v, dict):
        if dtype != DT.DT_STRING:
            raise _type_error(v, dtype)
        if not is_b64(v):
            raise invalid(f"JSON Value: {json_value_str(v)} not formatted correctly for base64 data")
        try:
            return base64.b64decode(v["b64"], validate=True)
        except (binascii.Error, ValueError):
            try:  # absl::Base64Unescape also takes the URL-safe alphabet and missing padding
                s = v["b64"]
                return base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))
            except (binascii.Error, ValueError):
                raise invalid("Unable to base64 decode") from None
    if dtype == DT.DT_STRING:
        if not isinstance(v, str):
            raise _type_error(v, dtype)
        return v.encode("utf-8")
    if dtype == DT.DT_BOOL:
        if not isinstance(v, bool):
            raise _type_error(v, dtype)
        return v
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise _type_error(v, dtype)
    if dtype in _FLOAT_MAX:
        if isinstance(v, int):
            if abs(v) > _FLOAT_MAX_INT[dtype]:
                raise invalid(f"Cannot convert JSON value: {v} to {dtype_name(dtype)} without loss of precision.")
        elif math.isfinite(v) and abs(v) > _FLOAT_MAX[dtype]:
            raise invalid(f"Cannot convert JSON value: {json_value_str(v)} to {dtype_name(dtype)} "
                          "without loss of precision.")
        return v
    if dtype not in _INT_RANGE:
        raise ServingUnimplemented(v, dtype)
    lo, hi = _INT_RANGE[dtype]
    if isinstance(v, float) or not lo <= v <= hi:
        raise _type_error(v, dtype)
    return v


def ServingUnimplemented(v: Any, dtype: int) -> Exception:  # noqa: N802 - mirrors errors::Unimplemented
    import grpc

    from serving.modelserver.errors import ServingError
    return ServingError(grpc.StatusCode.UNIMPLEMENTED,
                        f"Conversion of JSON Value: {json_value_str(v)} to type: {dtype_name(dtype)}")


def _dense_shape(v: Any) -> list[int]:
    shape = []
    while isinstance(v, list):
        shape.append(len(v))
        if not v:
            break
        v = v[0]
    return shape


def _fill(v: Any, level: int, shape: list[int], dtype: int, out: list) -> None:
    rank = len(shape)
    if not isinstance(v, list):
        if level != rank:
            raise invalid(f"JSON Value: {json_value_str(v)} found at incorrect level: {level + 1} in the JSON DOM. "
                          f"Expected at level: {rank}")
        out.append(_scalar(v, dtype))
        return
    if level >= rank:
        raise invalid(f"Encountered list at unexpected level: {level} expected < {rank}")
    if len(v) != shape[level]:
        raise invalid(f"Encountered list at unexpected size: {len(v)} at level: {level} "
                      f"expected size: {shape[level]}")
    for item in v:
        _fill(item, level + 1, shape, dtype, out)


_FAST_KINDS = {  # numpy kinds a JSON list may come out as, for which the element checks are vectorised
    DT.DT_FLOAT: "iuf", DT.DT_DOUBLE: "iuf", DT.DT_HALF: "iuf",
    DT.DT_INT32: "iu", DT.DT_INT16: "iu", DT.DT_INT8: "iu", DT.DT_UINT8: "iu", DT.DT_UINT16: "iu",
    DT.DT_INT64: "iu", DT.DT_UINT32: "iu", DT.DT_UINT64: "iu", DT.DT_BOOL: "b",
}


def json_to_array(v: Any, dtype: int) -> np.ndarray:
    """One JSON tensor value → ndarray, with json_tensor.cc's checks and texts (vectorised when it can be)."""
    kinds = _FAST_KINDS.get(dtype)
    if kinds and isinstance(v, list):
        try:
            arr = np.asarray(v)
        except (ValueError, OverflowError):
            arr = None
        if arr is not None and arr.dtype.kind in kinds and arr.ndim == len(_dense_shape(v)):
            if arr.size == 0:
                return arr.astype(NUMPY_DTYPE[dtype])
            if dtype in _INT_RANGE:
                lo, hi = _INT_RANGE[dtype]
                ok = bool(arr.min() >= lo and arr.max() <= hi)
            elif dtype == DT.DT_BOOL:
                ok = True
            elif arr.dtype.kind == "f":
                finite = arr[np.isfinite(arr)]
                ok = not (finite.size and np.abs(finite).max() > _FLOAT_MAX[dtype])
            else:
                ok = bool(np.abs(arr).max() <= _FLOAT_MAX_INT[dtype])
            if ok:
                return arr.astype(NUMPY_DTYPE[dtype], copy=False)
    shape = _dense_shape(v)
    out: list = []
    _fill(v, 0, shape, dtype, out)
    np_dtype = NUMPY_DTYPE.get(dtype)
    if np_dtype is None:
        raise ServingUnimplemented(v, dtype)
    if dtype == DT.DT_STRING:
        arr = np.empty(len(out), dtype=object)
        arr[:] = out
    else:
        arr = np.array(out, dtype=np_dtype)
    return arr.reshape(shape)


def _status_text(exc: Exception) -> str:
    code = getattr(exc, "code", None)
    return f"{code.name}: {exc.message}" if code is not None else str(exc)


def instances_to_inputs(doc: dict, key_value: Any, input_dtypes: dict[str, int]) -> dict[str, np.ndarray]:
    """FillTensorMapFromInstancesList: row format."""
    items = key_value
    first = items[0]
    if not isinstance(first, dict) and len(input_dtypes) > 1:
        raise invalid("instances is a plain list, but expecting list of objects as multiple input tensors "
                      "required as per tensorinfo_map")

    def is_obj(v: Any) -> bool:
        return isinstance(v, dict) and not is_b64(v)

    objects = is_obj(first)
    names = sorted(input_dtypes)
    rows: dict[str, list[np.ndarray]] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    for i, elem in enumerate(items):
        if objects:
            if not is_obj(elem):
                raise invalid(f"Expecting object but got list at item {i} of input list")
            for name, value in elem.items():
                try:
                    if name not in input_dtypes:
                        raise invalid(f"JSON object: does not have named input: {name}")
                    _add_row(rows, shapes, name, value, input_dtypes[name])
                except Exception as exc:
                    if not hasattr(exc, "code"):
                        raise
                    raise invalid(f"Failed to process element: {i} key: {name} of 'instances' list. "
                                  f"Error: {_status_text(exc)}") from None
            if sorted(elem) != names:
                raise invalid(f"Failed to process element: {i} of 'instances' list. JSON object: "
                              f"{json_value_str(elem)} must only have keys: {','.join(names)}")
        else:
            if is_obj(elem):
                raise invalid(f"Expecting value/list but got object at item {i} of input list")
            name = names[0]
            try:
                _add_row(rows, shapes, name, elem, input_dtypes[name])
            except Exception as exc:
                if not hasattr(exc, "code"):
                    raise
                raise invalid(f"Failed to process element: {i} of 'instances' list. "
                              f"Error: {_status_text(exc)}") from None
    return {name: _stack(parts, input_dtypes[name]) for name, parts in rows.items()}


def _shape_str(shape: tuple[int, ...]) -> str:
    return "[" + ",".join(str(s) for s in shape) + "]"


def _add_row(rows: dict, shapes: dict, name: str, value: Any, dtype: int) -> None:
    arr = json_to_array(value, dtype)
    if name not in shapes:
        shapes[name] = arr.shape
    elif math.prod(shapes[name]) != arr.size:
        raise invalid(f"Expecting tensor size: {math.prod(shapes[name])} but got: {arr.size}")
    elif shapes[name] != arr.shape:
        raise invalid(f"Expecting shape {_shape_str(shapes[name])} but got: {_shape_str(arr.shape)}")
    rows.setdefault(name, []).append(arr)


def _stack(parts: list[np.ndarray], dtype: int) -> np.ndarray:
    if dtype == DT.DT_STRING:
        out = np.empty((len(parts), *parts[0].shape), dtype=object)
        for i, p in enumerate(parts):
            out[i] = p if p.ndim else p[()]
        return out
    return np.stack(parts)


def columnar_to_inputs(value: Any, input_dtypes: dict[str, int]) -> dict[str, np.ndarray]:
    """FillTensorMapFromInputsMap: columnar format."""
    if not isinstance(value, dict) or is_b64(value):
        if len(input_dtypes) > 1:
            raise invalid("inputs is a plain value/list, but expecting an object as multiple input tensors "
                          "required as per tensorinfo_map")
        name = next(iter(input_dtypes))
        return {name: json_to_array(value, input_dtypes[name])}
    out = {}
    for name in sorted(input_dtypes):
        if name not in value:
            raise invalid(f"Missing named input: {name} in 'inputs' object.")
        out[name] = json_to_array(value[name], input_dtypes[name])
    return out


# --- tensors → JSON (MakeJsonFromTensors) ------------------------------------------------------------------

def format_float(v: float, double: bool = False) -> str:
    """WriteDecimal: absl's six significant digits unless that does not round-trip, then max_digits10."""
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "-Infinity" if v < 0 else "Infinity"
    s = f"{v:.6g}"
    if double:
        if float(s) != v:
            s = f"{v:.17g}"
    elif np.float32(s) != np.float32(v):
        s = f"{v:.9g}"
    if "." not in s and "e" not in s and "n" not in s:
        s += ".0"
    return s


def _leaf_strings(flat: np.ndarray, name: str) -> list[str]:
    kind = flat.dtype.kind
    if flat.dtype == object:
        if name.endswith("_bytes"):
            return ['{"b64": ' + json.dumps(base64.b64encode(bytes(b)).decode()) + "}" for b in flat]
        return [json.dumps(b.decode("utf-8", "replace") if isinstance(b, bytes) else str(b), ensure_ascii=False)
                for b in flat]
    if kind == "f":
        double = flat.dtype == np.float64
        return [format_float(float(x), double) for x in flat.tolist()]
    if kind == "b":
        return ["true" if x else "false" for x in flat.tolist()]
    return [str(x) for x in flat.tolist()]


def _nest(leaves: list[str], shape: tuple[int, ...]) -> str:
    if not shape:
        return leaves[0]
    if len(shape) == 1:
        return "[" + ", ".join(leaves) + "]"
    step = math.prod(shape[1:])
    return "[" + ", ".join(_nest(leaves[i * step:(i + 1) * step], shape[1:]) for i in range(shape[0])) + "]"


def tensors_to_json(outputs: dict[str, np.ndarray], row: bool) -> str:
    names = sorted(outputs)
    if not names:
        raise invalid("Cannot convert empty tensor map to JSON")
    if not row:
        parts = {n: _nest(_leaf_strings(outputs[n].reshape(-1), n), outputs[n].shape) for n in names}
        if len(names) == 1:
            return '{"outputs": ' + parts[names[0]] + "}"
        return '{"outputs": {' + ", ".join(f"{json.dumps(n)}: {parts[n]}" for n in names) + "}}"
    batch = 0
    for n in names:
        shape = outputs[n].shape
        if not shape:
            raise invalid(f"Tensor name: {n} has no shape information ")
        if shape[0] < 1:
            raise invalid(f"Tensor name: {n} has invalid batch size: {shape[0]}")
        if batch and shape[0] != batch:
            raise invalid(f"Tensor name: {n} has inconsistent batch size: {shape[0]} expecting: {batch}")
        batch = shape[0]
    rows_by_name = {}
    for n in names:
        arr = outputs[n]
        leaves = _leaf_strings(arr.reshape(-1), n)
        step = math.prod(arr.shape[1:])
        rows_by_name[n] = [_nest(leaves[i * step:(i + 1) * step], arr.shape[1:]) for i in range(batch)]
    if len(names) == 1:
        body = ", ".join(rows_by_name[names[0]])
    else:
        body = ", ".join("{" + ", ".join(f"{json.dumps(n)}: {rows_by_name[n][i]}" for n in names) + "}"
                         for i in range(batch))
    return '{"predictions": [' + body + "]}"
