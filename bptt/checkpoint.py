"""Checkpoints: one ``.npz`` file (``numpy.savez``, read with ``allow_pickle=False``) holding the
arrays and a JSON header, written atomically (temp file in the same folder, fsync, os.replace).

What a trainer checkpoint holds, enough for ``Trainer.from_checkpoint(path).fit(...)`` to end
with exactly the weights of a run that was never interrupted:

* model type, config and weights (``model/<name>``, PyTorch's names), its dropout RNG state;
* optimizer type, config, lr, step count and buffers (``optim/<param>/<buffer>``);
* schedule, base lr, trainer settings (k1, k2, clip_norm, ...), update and epoch counters, history;
* the position inside the current epoch: group and step, the carried hidden state, the TBPTT
  ring buffer of chunk caches (k2 > k1), the dropout RNG state at that point, and a fingerprint
  of the data and batch size it refers to (``fit`` refuses other data);
* ``meta``: any JSON-able dict of the caller's (vocabulary, command-line configuration).

A missing, truncated, corrupted or foreign file raises :class:`CheckpointError` naming the file.
"""

import importlib
import json
import os
import tempfile

import numpy as np

FORMAT = "bptt-checkpoint"
VERSION = 1
HEADER_KEY = "__header__"


class CheckpointError(ValueError):
    """A checkpoint file is missing, unreadable, corrupted or not a bptt checkpoint."""


# ------------------------------------------------------------------------------------------
# The file


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
    """Read a checkpoint -> (header dict, arrays dict name -> ndarray); CheckpointError if unusable."""
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
    if header.get("version") != VERSION:
        raise CheckpointError(f"{path}: checkpoint version {header.get('version')!r}; this bptt reads version {VERSION}")
    return header, arrays


# ------------------------------------------------------------------------------------------
# Models


def _model_parts(model):
    header = {"type": type(model).__name__, "config": model.config,
              "rng_state": model.rng.bit_generator.state}
    arrays = {f"model/{k}": v for k, v in model.state_dict().items()}
    return header, arrays


def _build_model(path, header, arrays):
    from bptt.models import model_from_config
    try:
        m = header["model"]
        model = model_from_config(m["type"], m["config"])
        model.load_state_dict({k[len("model/"):]: v for k, v in arrays.items() if k.startswith("model/")})
        model.rng.bit_generator.state = m["rng_state"]
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(f"{path}: cannot rebuild the model ({type(e).__name__}: {e})") from None
    return model


def save_model(model, path, meta=None):
    """Write a model-only checkpoint (weights, config, dropout RNG) and ``meta``."""
    m_header, arrays = _model_parts(model)
    write(path, {"format": FORMAT, "version": VERSION, "model": m_header, "trainer": None, "meta": meta}, arrays)


def load_model(path):
    """(model, meta) from a trainer or model checkpoint, on the current backend."""
    header, arrays = read(path)
    return _build_model(path, header, arrays), header.get("meta")


# ------------------------------------------------------------------------------------------
# Cache structures (the TBPTT ring buffer): arrays, tuples, NamedTuples and __slots__ objects


def _class_name(cls):
    return f"{cls.__module__}:{cls.__qualname__}"


def _class_from(name):
    module, _, qualname = name.partition(":")
    if not (module == "bptt" or module.startswith(("bptt.", "bptt_kernels"))):
        raise ValueError(f"refusing to load class {name!r} from outside bptt")
    obj = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def encode(obj, backend, arrays, prefix):
    """JSON-able description of ``obj``; its arrays go (as host copies) into ``arrays``."""
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return {"v": obj}
    if isinstance(obj, (np.ndarray, backend.xp.ndarray)):
        key = f"{prefix}{len(arrays)}"
        arrays[key] = backend.to_host(obj)
        return {"a": key}
    if isinstance(obj, np.generic):
        return {"s": obj.item(), "dtype": obj.dtype.str}
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return {"nt": _class_name(type(obj)), "items": [encode(x, backend, arrays, prefix) for x in obj]}
    if isinstance(obj, (tuple, list)):
        return {"list" if isinstance(obj, list) else "tuple": [encode(x, backend, arrays, prefix) for x in obj]}
    slots = getattr(type(obj), "__slots__", None)
    if slots:
        return {"obj": _class_name(type(obj)),
                "slots": {s: encode(getattr(obj, s), backend, arrays, prefix) for s in slots}}
    raise CheckpointError(f"cannot save an object of type {_class_name(type(obj))} in a checkpoint")


def decode(desc, backend, arrays):
    """Inverse of :func:`encode`: arrays come back as the backend's device arrays."""
    if "v" in desc:
        return desc["v"]
    if "a" in desc:
        a = arrays[desc["a"]]
        return backend.asarray(a, a.dtype)
    if "s" in desc:
        return np.dtype(desc["dtype"]).type(desc["s"])
    if "nt" in desc:
        return _class_from(desc["nt"])(*[decode(x, backend, arrays) for x in desc["items"]])
    if "list" in desc:
        return [decode(x, backend, arrays) for x in desc["list"]]
    if "tuple" in desc:
        return tuple(decode(x, backend, arrays) for x in desc["tuple"])
    cls = _class_from(desc["obj"])
    obj = cls.__new__(cls)
    for name, value in desc["slots"].items():
        setattr(obj, name, decode(value, backend, arrays))
    return obj


# ------------------------------------------------------------------------------------------
# Trainers


def save_trainer(trainer, path, meta=None):
    """Write ``trainer`` (see the module docstring) and ``meta`` to ``path`` atomically."""
    be = trainer.backend
    m_header, arrays = _model_parts(trainer.model)
    opt_sd = trainer.optimizer.state_dict(be)
    for name, bufs in opt_sd["buffers"].items():
        for b, a in bufs.items():
            arrays[f"optim/{name}/{b}"] = a
    opt_sd["buffers"] = {name: sorted(bufs) for name, bufs in opt_sd["buffers"].items()}
    pos = trainer.position
    position = None
    if pos is not None:
        ring = [{"s0": s.s0, "s1": s.s1, "cache": encode(s.cache, be, arrays, "ring/"),
                 "keep": encode(s.keep, be, arrays, "ring/")} for s in pos.ring]
        position = {"backend": be.NAME, "group": pos.group, "offset": pos.offset, "fingerprint": pos.fingerprint,
                    "batch_size": pos.batch_size, "rng_state": pos.rng_state,
                    "state": encode(pos.state, be, arrays, "state/"), "ring": ring}
    header = {"format": FORMAT, "version": VERSION, "model": m_header, "optimizer": opt_sd,
              "schedule": trainer.schedule.state_dict(),
              "trainer": {"config": trainer.config, "base_lr": trainer.base_lr, "step": trainer.step,
                          "epoch": trainer.epoch, "history": trainer.history, "position": position},
              "meta": meta if meta is not None else trainer.meta}
    write(path, header, arrays)


def load_trainer(path):
    """Rebuild the trainer saved by :func:`save_trainer` on the current backend."""
    from bptt.optim import optimizer_from_state_dict, schedule_from_state_dict
    from bptt.trainer import Position, Segment, Trainer
    header, arrays = read(path)
    if not header.get("trainer"):
        raise CheckpointError(f"{path}: a model-only checkpoint (no trainer state); use bptt.checkpoint.load_model")
    model = _build_model(path, header, arrays)
    be = model.backend
    try:
        opt_sd = dict(header["optimizer"])
        opt_sd["buffers"] = {name: {b: arrays[f"optim/{name}/{b}"] for b in bufs}
                             for name, bufs in opt_sd["buffers"].items()}
        optimizer = optimizer_from_state_dict(opt_sd, be)
        t = header["trainer"]
        trainer = Trainer(model, optimizer, schedule=schedule_from_state_dict(header["schedule"]), **t["config"])
        trainer.base_lr = t["base_lr"]
        trainer.step, trainer.epoch = t["step"], t["epoch"]
        trainer.history = t["history"]
        trainer.meta = header.get("meta") or {}
        p = t["position"]
        if p is not None and p["ring"] and p["backend"] != be.NAME:
            raise CheckpointError(
                f"{path}: saved inside a TBPTT window (k2 > k1) with backend {p['backend']!r}, whose saved "
                f"activations only that backend can read; resume with BPTT_BACKEND={p['backend']} "
                f"(the backend now is {be.NAME!r})")
        if p is not None:
            ring = []
            for s in p["ring"]:
                cache = decode(s["cache"], be, arrays)
                for level, layer_cache in enumerate(cache.stack.layers):
                    layer_cache.owner = model.layers[level].layer_id   # caches belong to the new layers
                ring.append(Segment(s["s0"], s["s1"], cache, None, decode(s["keep"], be, arrays)))
            trainer.position = Position(p["group"], p["offset"], decode(p["state"], be, arrays), tuple(ring),
                                        p["rng_state"], p["fingerprint"], p["batch_size"])
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(f"{path}: cannot rebuild the trainer ({type(e).__name__}: {e})") from None
    return trainer
