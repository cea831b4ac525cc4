"""A self-contained serving artifact: the fused ensemble serialised with `jax.export`, weights baked in.

`export_ensemble` traces exactly the program `ensemble_predict` runs (strategy "map", the last m members)
behind an optional `preprocess` (e.g. the run's normalisation), with a symbolic batch dimension ``b``, and
returns `jax.export`'s serialised bytes. The file needs only jax and numpy to run:
``jax.export.deserialize(open(FILE, "rb").read()).call(x)``. `load_exported` does the same with one-line
errors for a damaged file and for an input of the wrong shape or dtype.
"""
import hashlib
import json
import numbers
import os
from typing import Any, Callable, Sequence

import jax
import numpy as np

from snapjax import ensemble
from snapjax.errors import ExportError

PyTree = Any
BATCH_DIM = "b"
DEFAULT_PLATFORMS = ("cpu", "cuda", "tpu")


def _input_spec(example_input: Any) -> jax.ShapeDtypeStruct:
  """The exported input: example_input's shape with a symbolic leading batch dim, and its dtype."""
  shape, dtype = np.shape(example_input), np.dtype(example_input.dtype)
  if len(shape) < 1:
    raise ValueError(f"example_input must have a leading batch axis, got shape {shape}")
  dims = ", ".join([BATCH_DIM, *(str(int(d)) for d in shape[1:])])
  return jax.ShapeDtypeStruct(jax.export.symbolic_shape(dims), dtype)


def export_ensemble(apply_fn: ensemble.ApplyFn, stacked: PyTree, example_input: Any, *, last_m: int | None = None,
                    preprocess: Callable[[jax.Array], Any] | None = None,
                    platforms: Sequence[str] = DEFAULT_PLATFORMS, return_members: bool = False) -> bytes:
  """Serialises the ensemble of the last ``last_m`` snapshots, as `ensemble_predict` computes it, for serving.

  The exported function maps a batch ``x`` of any size ``b`` (shaped and typed like ``example_input``
  otherwise) to ``ensemble_predict(apply_fn, stacked, preprocess(x), last_m=last_m, strategy="map")``: the
  mean softmax, float32 of shape ``(b, classes)``. The last m snapshots' variables are baked into the program
  as constants, so the bytes are all a server needs (with jax and numpy):
  ``jax.export.deserialize(blob).call(x)``.

  Args:
    apply_fn: ``apply_fn(variables, x) -> logits`` of shape ``(batch, classes)``, as for `ensemble_predict`.
    stacked: The M snapshots from `stack_snapshots`, every leaf of shape ``(M, ...)``.
    example_input: An array or ``jax.ShapeDtypeStruct`` of the raw input as it will be served (e.g. uint8
      ``(1, 28, 28, 1)`` images); its leading (batch) size is replaced by the symbolic ``b``.
    last_m: How many of the newest snapshots to average, an int in ``[1, M]``; ``None`` means all M.
    preprocess: Applied to the raw input inside the exported program before ``apply_fn`` (e.g. the run's
      normalisation); ``None`` passes it as is.
    platforms: The platforms to lower for (``"cpu"``, ``"cuda"``, ``"rocm"``, ``"tpu"``); the artifact runs
      on any of them.
    return_members: The exported function also returns every member's softmax, float32 of shape
      ``(last_m, b, classes)``, oldest first.

  Returns:
    The serialised `jax.export.Exported`, as bytes.

  Raises:
    ValueError: If ``last_m`` is out of range, ``example_input`` has no batch axis, ``platforms`` is empty, or
      ``apply_fn`` fails as `ensemble_predict` would.

  Examples:
    >>> import jax, jax.numpy as jnp, numpy as np
    >>> import snapjax
    >>> def apply_fn(variables, x):
    ...   return x @ variables["w"]
    >>> stacked = snapjax.stack_snapshots([{"w": k * jnp.eye(2)} for k in (1.0, 2.0, 3.0)])
    >>> blob = snapjax.export_ensemble(apply_fn, stacked, np.zeros((1, 2), np.uint8), last_m=2,
    ...                                preprocess=lambda x: x.astype(jnp.float32), platforms=("cpu",))
    >>> exported = jax.export.deserialize(blob)
    >>> exported.in_avals, exported.out_avals
    ((ShapedArray(uint8[b,2]),), (ShapedArray(float32[b,2]),))
    >>> np.asarray(exported.call(np.array([[1, 0], [0, 2]], np.uint8)), np.float64).round(3).tolist()
    [[0.917, 0.083], [0.01, 0.99]]
  """
  num = ensemble.num_members(stacked)
  if last_m is None:
    last_m = num
  if isinstance(last_m, bool) or not isinstance(last_m, numbers.Integral) or not 1 <= last_m <= num:
    raise ValueError(f"last_m must be None or an int in [1, {num}] (M={num} snapshots), got {last_m!r}")
  platforms = tuple(platforms)
  if not platforms:
    raise ValueError("platforms must name at least one platform, e.g. ('cpu', 'cuda', 'tpu')")
  last_m = int(last_m)
  # Only the last m members travel, as host arrays: constants of a single-device program.
  last = jax.tree.map(lambda a: np.asarray(jax.device_get(a))[num - last_m:], stacked)

  def serve(x):
    x = preprocess(x) if preprocess is not None else x
    # Host arrays are on no mesh axis, so this is ensemble_predict's single-program path.
    return ensemble.ensemble_predict(apply_fn, last, x, last_m=last_m, strategy="map",
                                     return_members=bool(return_members))

  exported = jax.export.export(jax.jit(serve), platforms=platforms)(_input_spec(example_input))
  return bytes(exported.serialize())


class ExportedEnsemble:
  """A deserialised ensemble (`load_exported`): call it on a batch; the input's shape and dtype are checked first.

  Attributes:
    exported: The `jax.export.Exported`.
    source: Where it was read from (a path, or ``"<bytes>"``).
    input_shape: The expected input shape, ``"b"`` for the batch size, e.g. ``("b", 28, 28, 1)``.
    input_dtype: The expected input dtype, e.g. ``uint8``.
  """

  def __init__(self, exported: jax.export.Exported, source: str):
    self.exported, self.source = exported, source
    aval = exported.in_avals[0]
    self.input_shape = tuple(d if isinstance(d, int) else str(d) for d in aval.shape)
    self.input_dtype = np.dtype(aval.dtype)

  @property
  def platforms(self) -> tuple[str, ...]:
    """The platforms the artifact was lowered for, e.g. ``("cpu", "cuda", "tpu")``."""
    return tuple(self.exported.platforms)

  def _check(self, x: Any) -> None:
    shape, dtype = tuple(np.shape(x)), np.dtype(getattr(x, "dtype", np.asarray(x).dtype))
    want = "(" + ", ".join(str(d) for d in self.input_shape) + ")"
    fits = len(shape) == len(self.input_shape) and shape[0] >= 1 and all(
        not isinstance(w, int) or w == s for w, s in zip(self.input_shape, shape))
    if not fits or dtype != self.input_dtype:
      raise ValueError(f"the exported ensemble {self.source} expects input of shape {want} (b: any batch size) and "
                       f"dtype {self.input_dtype}, got shape {shape} and dtype {dtype}")

  def __call__(self, x: Any) -> Any:
    """The ensemble's output on the batch x (mean probabilities, and members if exported with them)."""
    self._check(x)
    return self.exported.call(x)


def _check_sidecar(data: bytes, path: str) -> None:
  """Compares the bytes with the size and sha256 recorded in path + '.json', where that file exists."""
  meta_path = path + ".json"
  if not os.path.exists(meta_path):
    return
  try:
    with open(meta_path) as f:
      meta = json.load(f)
  except (OSError, ValueError):
    return  # The metadata is informative only; the artifact itself is checked below.
  size, digest = meta.get("bytes"), meta.get("sha256")
  if isinstance(size, int) and size != len(data):
    what = "truncated" if len(data) < size else "longer than written"
    raise ExportError(f"exported ensemble {path} is {what}: {len(data)} bytes, {meta_path} records {size}")
  if isinstance(digest, str) and digest != hashlib.sha256(data).hexdigest():
    raise ExportError(f"exported ensemble {path} is corrupt: its sha256 differs from the one in {meta_path}")


def load_exported(path_or_bytes: str | os.PathLike | bytes | bytearray) -> ExportedEnsemble:
  """Reads an exported ensemble (`export_ensemble`, ``eval.py --export``) and returns it as a callable.

  Where a path has its ``PATH.json`` beside it (as ``eval.py --export`` writes), the file's size and sha256
  are checked against it first.

  Args:
    path_or_bytes: The file's path, or its bytes.

  Returns:
    An `ExportedEnsemble`: ``model(x)`` checks ``x`` against the exported input shape and dtype, then runs.

  Raises:
    snapjax.errors.ExportError: If the file cannot be read or is not a whole `jax.export` artifact (one line
      naming the file and what is wrong).

  Examples:
    >>> import jax.numpy as jnp, numpy as np
    >>> import snapjax
    >>> stacked = snapjax.stack_snapshots([{"w": jnp.eye(2)}, {"w": 2 * jnp.eye(2)}])
    >>> blob = snapjax.export_ensemble(lambda v, x: x @ v["w"], stacked, np.zeros((1, 2), np.float32),
    ...                                platforms=("cpu",))
    >>> model = snapjax.load_exported(blob)
    >>> model(np.zeros((3, 2), np.float32)).shape
    (3, 2)
    >>> model(np.zeros((3, 2), np.int32))
    Traceback (most recent call last):
    ...
    ValueError: the exported ensemble <bytes> expects input of shape (b, 2) (b: any batch size) and dtype float32, ...
  """
  if isinstance(path_or_bytes, (bytes, bytearray)):
    data, source = bytes(path_or_bytes), "<bytes>"
  else:
    source = os.fspath(path_or_bytes)
    try:
      with open(source, "rb") as f:
        data = f.read()
    except OSError as e:
      raise ExportError(f"cannot read exported ensemble {source}: {e.strerror or e}") from e
    _check_sidecar(data, source)
  if not data:
    raise ExportError(f"exported ensemble {source} is empty (0 bytes)")
  try:
    exported = jax.export.deserialize(bytearray(data))
    exported.mlir_module()  # Parses the program: a cut or damaged module fails here, not at the first call.
  except Exception as e:  # pylint: disable=broad-except  # Any failure to parse means a damaged file.
    reason = " ".join(str(e).split())[:200]
    raise ExportError(f"exported ensemble {source} ({len(data)} bytes) is truncated or not a jax.export artifact "
                      f"({type(e).__name__}: {reason})") from e
  if len(exported.in_avals) != 1:
    raise ExportError(f"exported ensemble {source} takes {len(exported.in_avals)} inputs; expected one batch")
  return ExportedEnsemble(exported, source)
