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
import tempfile

import numpy as np

FORMAT = "bptt-checkpoint"
VERSION = 2
READABLE_VERSIONS = (1, 2)
HEADER_KEY = "__header__"
ARRAY_KEY = "__array__"


class CheckpointError(ValueError):
    """A checkpoint file is missing, unreadable, corrupted, of another version or not a bptt checkpoint."""


def write(path, header, arrays):
    """Atomically write ``arrays`` (name -> host ndarray) and the JSON ``header`` to ``path``."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    payload = dict(arrays)
    payload[HEADER_KEY] = np.frombuffer(json.dumps(header).encode("utf-8"), dtype=np.uint8)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    try:                                             # make the rename itself durable
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass


def read(path):
    """(header dict, arrays dict name -> ndarray) of a checkpoint of a readable version;
    CheckpointError naming the file if it is unusable."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        header = json.loads(arrays.pop(HEADER_KEY).tobytes().decode("utf-8"))
    except Exception as e:  # BadZipFile, truncated data, missing header, bad JSON, not an npz at all
        raise CheckpointError(f"{path}: not a readable bptt checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a bptt checkpoint (format {header.get('format') if isinstance(header, dict) else None!r})")
    if header.get("version") not in READABLE_VERSIONS:
        raise CheckpointError(f"{path}: checkpoint format version {header.get('version')!r}; this bptt reads "
                              f"versions {', '.join(map(str, READABLE_VERSIONS))} and writes version {VERSION}")
    return header, arrays


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


def unflatten(tree, arrays):
    """Inverse of :func:`flatten`: the header's tree with its arrays put back."""
    if isinstance(tree, dict):
        if set(tree) == {ARRAY_KEY}:
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
        return {"model": model, "trainer": None if state is None else unflatten(state, arrays),
                "meta": header.get("meta")}
    except Exception as e:
        raise CheckpointError(f"{path}: a damaged checkpoint header ({type(e).__name__}: {e})") from None


def rebuild(path, what, build, *args):
    """``build(*args)``, any error but a CheckpointError turned into one naming ``path`` and ``what``."""
    try:
        return build(*args)
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(f"{path}: cannot rebuild the {what} ({type(e).__name__}: {e})") from None
