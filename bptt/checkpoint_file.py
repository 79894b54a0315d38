"""The checkpoint file: one ``.npz`` (``numpy.savez``, read with ``allow_pickle=False``) of a
JSON header and named arrays, written atomically (temp file in the same folder, fsync,
os.replace). What goes into it is :mod:`bptt.checkpoint`'s and the trainer's business.

Header (format version 2)::

    {"format": "bptt-checkpoint", "version": 2,
     "model":   model_to_dict(model) with every array replaced by {"__array__": name},
     "trainer": Trainer.state_dict() without "model" and "meta", arrays replaced the same way
                (None in a model-only checkpoint),
     "meta":    the caller's JSON-able dict or None}

Nested state dicts are stored by :func:`flatten`: dicts, lists, str, int, float, bool and None
go into the header as they are, arrays into the file under their path (``model/weights/...``,
``trainer/position/ring/0/cache/...``). Nothing is stored by class name, so any backend reads
any checkpoint.

Version 1 (until the ring buffer was stored by field name) kept the model as {"type",
"config", "rng_state"} with arrays ``model/<name>``; its models still load, its trainers do not.
"""

import json
import os
import shutil
import tempfile
import time
import zipfile

import numpy as np

FORMAT = "bptt-checkpoint"
VERSION = 2
READABLE_VERSIONS = (1, 2)
HEADER_KEY = "__header__"
ARRAY_KEY = "__array__"


class CheckpointError(ValueError):
    """A checkpoint file is missing, unreadable, corrupted, of another version or not a bptt checkpoint."""


class CheckpointWriteError(OSError):
    """Writing a checkpoint failed (disk full, no permission, ...); the file it was to replace,
    if any, is unchanged and no temp file is left. ``errno`` is the underlying error's."""

    def __str__(self):
        return self.args[1] if len(self.args) > 1 else super().__str__()


PAUSE_ENV = "BPTT_TEST_PAUSE_IN_WRITE"   # tests: "S" or "S,N": sleep S seconds between the temp file
_writes = [0]                            # and its rename (after the first N writes of the process)


def _atomic_write(path, fill):
    """Write ``path`` atomically: ``fill(f)`` writes a temp file ``.<name>.<random>.tmp`` in the
    same folder, which is fsynced and renamed over ``path`` (os.replace); the folder is fsynced
    after. On any error the temp file is removed and ``path`` is unchanged; an OSError comes out
    as a CheckpointWriteError naming ``path``. A process killed during the write leaves the temp
    file (``bptt.checkpointing`` removes such files when a run resumes) and never a partial
    ``path``. With the environment variable BPTT_TEST_PAUSE_IN_WRITE=S (or S,N: the writes after
    the first N of the process) a write sleeps S seconds once the temp file is complete, before
    the rename (tests kill a process there)."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            fill(f)
            f.flush()
            os.fsync(f.fileno())
        _writes[0] += 1
        pause = os.environ.get(PAUSE_ENV)
        if pause:
            seconds, _, skip = pause.partition(",")
            if _writes[0] > int(skip or 0):
                time.sleep(float(seconds))
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, OSError) and not isinstance(e, CheckpointWriteError):
            raise CheckpointWriteError(e.errno, f"cannot write the checkpoint {path}: {e.strerror or e}; "
                                       "no existing file was changed") from e
        raise
    try:                                             # make the rename itself durable
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass


def write(path, header, arrays):
    """Atomically write ``arrays`` (name -> host ndarray) and the JSON ``header`` to ``path``
    (CheckpointWriteError, an OSError, if that fails; ``path`` is then unchanged)."""
    payload = dict(arrays)
    payload[HEADER_KEY] = np.frombuffer(json.dumps(header).encode("utf-8"), dtype=np.uint8)
    _atomic_write(path, lambda f: np.savez(f, **payload))


def copy(source, path):
    """Atomically write a copy of the file ``source`` to ``path`` (as :func:`write`)."""
    def fill(f):
        with open(source, "rb") as src:
            shutil.copyfileobj(src, f, 1 << 20)
    _atomic_write(path, fill)


def read(path):
    """(header dict, arrays dict name -> ndarray) of a checkpoint of a readable version;
    CheckpointError naming the file if it is unusable.

    Nothing is unpickled and nothing is allocated on a member's word: each ``.npy`` member's
    header (its dtype, shape and order) is read and checked before its data, so an object array,
    a non-numeric dtype or a shape larger than the bytes the member holds is refused before any
    memory is set aside for it. The JSON header must be an object naming the bptt format.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        raise CheckpointError(f"{path}: is a directory, not a checkpoint file")
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
        raise CheckpointError(f"{path}: not a readable bptt checkpoint: not an .npz (zip) archive, or a "
                              f"truncated one ({type(e).__name__}: {e})") from None
    arrays = {}
    with archive:
        size = os.path.getsize(path)
        for info in archive.infolist():
            if not info.filename.endswith(".npy"):
                raise CheckpointError(f"{path}: not a bptt checkpoint (member {info.filename!r} is not an .npy array)")
            name = info.filename[: -len(".npy")]
            if name in arrays:
                raise CheckpointError(f"{path}: a damaged checkpoint (the array {name!r} appears twice)")
            try:
                arrays[name] = _read_member(archive, info, size)
            except CheckpointError as e:
                raise CheckpointError(f"{path}: {e}") from None
            except Exception as e:   # BadZipFile (CRC), truncated data, a malformed .npy header
                raise CheckpointError(f"{path}: not a readable bptt checkpoint (array {name!r}: "
                                      f"{type(e).__name__}: {e})") from None
    raw = arrays.pop(HEADER_KEY, None)
    if raw is None:
        raise CheckpointError(f"{path}: not a bptt checkpoint (no {HEADER_KEY} member)")
    if raw.dtype != np.uint8 or raw.ndim != 1:
        raise CheckpointError(f"{path}: a damaged checkpoint (its header is a {raw.dtype} array of shape "
                              f"{raw.shape}, not bytes)")
    try:
        header = json.loads(raw.tobytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{path}: a damaged checkpoint (its header is not UTF-8: byte {e.start})") from None
    except (ValueError, RecursionError) as e:
        raise CheckpointError(f"{path}: a damaged checkpoint (its header is not valid JSON: {e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: not a bptt checkpoint (its header is a JSON "
                              f"{_JSON_NAMES.get(type(header), type(header).__name__)}, not an object)")
    if header.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a bptt checkpoint (format {header.get('format')!r}, "
                              f"expected {FORMAT!r})")
    if header.get("version") not in READABLE_VERSIONS:
        raise CheckpointError(f"{path}: checkpoint format version {header.get('version')!r}; this bptt reads "
                              f"versions {', '.join(map(str, READABLE_VERSIONS))} and writes version {VERSION}")
    return header, arrays


_JSON_NAMES = {list: "array", int: "number", float: "number", str: "string", bool: "boolean",
               type(None): "null"}
# what a checkpoint's arrays may hold: booleans and numbers (no objects, strings, structures)
_ARRAY_KINDS = "biufc"


def _read_member(archive, info, archive_size):
    """The array of the ``.npy`` member ``info``; its header is checked before its data is read."""
    name = info.filename[: -len(".npy")]
    if info.compress_type == zipfile.ZIP_STORED and info.file_size != info.compress_size:
        raise CheckpointError(f"a damaged checkpoint (array {name!r}: {info.file_size:,} bytes declared, "
                              f"{info.compress_size:,} stored)")
    if info.compress_size > archive_size or info.file_size > 2000 * info.compress_size + (1 << 20):
        raise CheckpointError(f"a damaged checkpoint (array {name!r}: its declared size {info.file_size:,} "
                              "bytes does not fit the file)")
    with archive.open(info) as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
        else:
            raise CheckpointError(f"not a bptt checkpoint (array {name!r} is .npy format {version})")
        if dtype.hasobject:
            raise CheckpointError(f"not a bptt checkpoint: array {name!r} holds Python objects, which would "
                                  "have to be unpickled; refused")
        if dtype.kind not in _ARRAY_KINDS or dtype.fields is not None or dtype.subdtype is not None:
            raise CheckpointError(f"not a bptt checkpoint (array {name!r} has dtype {dtype}, not a number type)")
        count = 1
        for n in shape:
            count *= n
        nbytes = count * dtype.itemsize
        held = info.file_size - f.tell()
        if nbytes != held:
            raise CheckpointError(f"a damaged checkpoint (array {name!r} declares shape {shape} {dtype} = "
                                  f"{nbytes:,} bytes but holds {held:,})")
        data = f.read(nbytes)
    if len(data) != nbytes:
        raise CheckpointError(f"a truncated checkpoint (array {name!r}: {len(data):,} of {nbytes:,} bytes)")
    array = np.frombuffer(data, dtype=dtype).copy()
    return array.reshape(shape, order="F" if fortran else "C")


def flatten(tree, prefix, arrays):
    """The JSON-able copy of ``tree`` (nested dicts with str keys, lists, tuples, scalars, None and
    numpy arrays), each array moved into ``arrays`` under its path below ``prefix``."""
    if isinstance(tree, np.ndarray):
        if prefix in arrays:
            raise ValueError(f"two arrays at the path {prefix!r}")
        arrays[prefix] = tree
        return {ARRAY_KEY: prefix}
    if isinstance(tree, dict):
        if ARRAY_KEY in tree:
            raise ValueError(f"a state dict may not use the key {ARRAY_KEY!r}")
        return {str(k): flatten(v, f"{prefix}/{k}", arrays) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return [flatten(v, f"{prefix}/{i}", arrays) for i, v in enumerate(tree)]
    if isinstance(tree, np.generic):
        return tree.item()
    if tree is None or isinstance(tree, (bool, int, float, str)):
        return tree
    raise TypeError(f"cannot store a {type(tree).__name__} (at {prefix!r}) in a checkpoint")


class MissingArrayError(KeyError):
    """The header refers to an array the file does not hold."""

    def __str__(self):
        return f"its header refers to the array {self.args[0]!r}, which the file lacks"


def unflatten(tree, arrays):
    """Inverse of :func:`flatten`: the header's tree with its arrays put back (MissingArrayError,
    a KeyError, for a reference to an array ``arrays`` lacks)."""
    if isinstance(tree, dict):
        if set(tree) == {ARRAY_KEY}:
            if not isinstance(tree[ARRAY_KEY], str) or tree[ARRAY_KEY] not in arrays:
                raise MissingArrayError(tree[ARRAY_KEY])
            return arrays[tree[ARRAY_KEY]]
        return {k: unflatten(v, arrays) for k, v in tree.items()}
    if isinstance(tree, list):
        return [unflatten(v, arrays) for v in tree]
    return tree


def save(path, model, trainer=None, meta=None):
    """Write the model dict (``bptt.models.model_to_dict``), the trainer's state (or None) and
    ``meta`` to ``path`` atomically (format version :data:`VERSION`)."""
    arrays = {}
    header = {"format": FORMAT, "version": VERSION, "model": flatten(model, "model", arrays),
              "trainer": None if trainer is None else flatten(trainer, "trainer", arrays), "meta": meta}
    write(path, header, arrays)


def load(path, trainer=False):
    """{"model", "trainer" (None in a model-only checkpoint), "meta"} of the checkpoint ``path``,
    arrays as host numpy arrays. ``trainer=True``: the trainer's state is needed; a model-only
    checkpoint or one of an older version raises CheckpointError (one line)."""
    header, arrays = read(path)
    version = header["version"]
    if trainer and not header.get("trainer"):
        raise CheckpointError(f"{path}: a model-only checkpoint (no trainer state); use bptt.checkpoint.load_model")
    if trainer and version != VERSION:
        raise CheckpointError(f"{path}: a trainer checkpoint of format version {version}; this bptt resumes "
                              f"version {VERSION} only (the weights still load with bptt.checkpoint.load_model)")
    try:
        if version == 1:
            model = dict(header["model"], weights={k[len("model/"):]: a for k, a in arrays.items()
                                                   if k.startswith("model/")})
        else:
            model = unflatten(header["model"], arrays)
        state = header.get("trainer") if version == VERSION else None
        parts = {"model": model, "trainer": None if state is None else unflatten(state, arrays),
                 "meta": header.get("meta")}
    except MissingArrayError as e:
        raise CheckpointError(f"{path}: a damaged checkpoint ({e})") from None
    except Exception as e:
        raise CheckpointError(f"{path}: a damaged checkpoint header ({type(e).__name__}: {e})") from None
    _check_model_part(path, parts["model"])
    return parts


# config entries that are not sizes
_NOT_SIZES = ("seed", "dtype", "cell", "readout", "dropout", "tie_weights")


def _check_model_part(path, model):
    """CheckpointError unless the model part is {"type", "config", "weights", ...} whose weights are
    arrays of the config's dtype, and whose config sizes are no larger than its arrays' dimensions
    (so a hand-edited config cannot make the rebuilt model allocate more than the file holds)."""
    if not isinstance(model, dict) or not isinstance(model.get("config"), dict) \
            or not isinstance(model.get("weights"), dict) or not isinstance(model.get("type"), str):
        raise CheckpointError(f"{path}: a damaged checkpoint header (its model is not a dict of type, config "
                              "and weights)")
    config, weights = model["config"], model["weights"]
    bad = next((k for k, w in weights.items() if not isinstance(w, np.ndarray)), None)
    if bad is not None:
        raise CheckpointError(f"{path}: a damaged checkpoint header (the weight {bad!r} is not an array)")
    dtype = config.get("dtype")
    if isinstance(dtype, str):
        wrong = next((k for k, w in weights.items() if w.dtype.name != dtype), None)
        if wrong is not None:
            raise CheckpointError(f"{path}: the weight {wrong!r} is {weights[wrong].dtype.name}, but the model "
                                  f"is {dtype}")
    largest = max((n for w in weights.values() for n in w.shape), default=0)
    for key, value in config.items():
        if key in _NOT_SIZES or isinstance(value, bool) or not isinstance(value, int):
            continue
        limit = len(weights) if key == "num_layers" else largest
        if value > limit:
            raise CheckpointError(f"{path}: the model's {key} {value:,} does not match its weights "
                                  f"(the largest {'count' if key == 'num_layers' else 'dimension'} is {limit:,})")


def rebuild(path, what, build, *args):
    """``build(*args)``, any error but a CheckpointError turned into one naming ``path`` and ``what``."""
    try:
        return build(*args)
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(f"{path}: cannot rebuild the {what} ({type(e).__name__}: {e})") from None
