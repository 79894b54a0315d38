"""Optimizers, global-norm gradient clipping and learning-rate schedules.

Update rules are exactly torch.optim's (``torch.optim.SGD`` with dampening 0, ``torch.optim.Adam``
with L2 ``weight_decay``), run in place on the device by the backend's fused ``sgd_step`` /
``adam_step`` kernels. An optimizer is not bound to a model at construction: ``step(params,
grads)`` takes the model's ``params`` and ``grads`` dicts (name -> device array) and keeps its
per-parameter state (momentum buffer, Adam moments) under the same names, so
``state_dict()`` / ``load_state_dict()`` round-trip through a checkpoint.

Schedules give the learning rate of an epoch (0-based) from the base learning rate; the trainer
sets ``optimizer.lr`` from its schedule at the start of every epoch, and after every validation
(:meth:`Schedule.on_validation` feeds the validation loss to schedules that use it, such as
:class:`PlateauDecay`). A schedule's state (what it learnt from the validations) is part of its
``state_dict``, so a resumed run continues with the learning rate it had.
"""

import math

import numpy as np

from bptt.backend import get_backend


def _check_nonneg(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)) \
            or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0; got {value!r}")
    return float(value)


class Optimizer:
    """Base class: per-parameter state buffers (device arrays) kept by parameter name."""

    def __init__(self, lr):
        self.lr = _check_nonneg("lr", lr)
        self.steps = 0        # updates made (Adam's bias-correction step count)
        self.state = {}       # param name -> dict buffer name -> device array

    @property
    def config(self):
        """Constructor keyword arguments (JSON-able): ``type(opt)(**opt.config)`` rebuilds it."""
        raise NotImplementedError

    def _check(self, params, grads):
        missing = set(params) ^ set(grads)
        if missing:
            raise ValueError(f"params and grads must have the same names; these differ: {sorted(missing)}")

    def step(self, params, grads, backend=None):
        """Update every params[name] in place from grads[name] (dicts of device arrays of
        ``backend``; default: the backend in use, ``bptt.get_backend()``)."""
        raise NotImplementedError

    def state_dict(self, backend=None):
        """Host copies: {"type", "config", "lr", "steps", "buffers": {param: {buf: ndarray}}}."""
        backend = backend or get_backend()
        return {"type": type(self).__name__, "config": self.config, "lr": self.lr, "steps": self.steps,
                "buffers": {name: {k: np.array(backend.to_host(a), copy=True) for k, a in bufs.items()}
                            for name, bufs in self.state.items()}}

    def load_state_dict(self, sd, backend=None):
        """Restore from :meth:`state_dict` (buffers copied: the optimizer never aliases ``sd``)."""
        backend = backend or get_backend()
        if sd.get("type") != type(self).__name__:
            raise ValueError(f"optimizer state is for {sd.get('type')!r}, not {type(self).__name__}")
        self.lr = float(sd["lr"])
        self.steps = int(sd["steps"])
        self.state = {name: {k: backend.asarray(np.array(a, copy=True), np.asarray(a).dtype)
                             for k, a in bufs.items()}
                      for name, bufs in sd["buffers"].items()}


class SGD(Optimizer):
    """Stochastic gradient descent, torch.optim.SGD's rule (dampening 0)::

        d = grad + weight_decay * p
        buf = d (first step) | momentum * buf + d        (when momentum != 0)
        d = d + momentum * buf (nesterov) | buf          (when momentum != 0)
        p -= lr * d

    With momentum 0 this is the plain ``p.data.add_(p.grad, alpha=-lr)`` of PyTorch's
    word_language_model example.
    """

    def __init__(self, lr, momentum=0.0, weight_decay=0.0, nesterov=False):
        super().__init__(lr)
        self.momentum = _check_nonneg("momentum", momentum)
        self.weight_decay = _check_nonneg("weight_decay", weight_decay)
        self.nesterov = bool(nesterov)
        if self.nesterov and self.momentum == 0:
            raise ValueError("nesterov=True needs momentum > 0 (as torch.optim.SGD)")

    @property
    def config(self):
        return {"lr": self.lr, "momentum": self.momentum, "weight_decay": self.weight_decay,
                "nesterov": self.nesterov}

    def step(self, params, grads, backend=None):
        backend = backend or get_backend()
        self._check(params, grads)
        for name, p in params.items():
            g = grads[name]
            first = name not in self.state
            if self.momentum != 0:
                if first:
                    self.state[name] = {"momentum_buffer": backend.zeros(p.shape, p.dtype)}
                buf = self.state[name]["momentum_buffer"]
            else:
                buf = g  # not read by the rule when momentum == 0
            backend.sgd_step(p, g, buf, self.lr, self.momentum, self.weight_decay, self.nesterov, first)
        self.steps += 1


class Adam(Optimizer):
    """Adam, torch.optim.Adam's rule (L2 weight decay folded into the gradient)::

        g = grad + weight_decay * p
        m = beta1 m + (1 - beta1) g ;  v = beta2 v + (1 - beta2) g^2      (m, v start at 0)
        p -= lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)  (t counts from 1)
    """

    def __init__(self, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
        super().__init__(lr)
        if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"betas must be two numbers in [0, 1); got {betas!r}")
        self.betas = (float(betas[0]), float(betas[1]))
        self.eps = _check_nonneg("eps", eps)
        self.weight_decay = _check_nonneg("weight_decay", weight_decay)

    @property
    def config(self):
        return {"lr": self.lr, "betas": list(self.betas), "eps": self.eps, "weight_decay": self.weight_decay}

    def step(self, params, grads, backend=None):
        backend = backend or get_backend()
        self._check(params, grads)
        t = self.steps + 1
        for name, p in params.items():
            if name not in self.state:
                self.state[name] = {"exp_avg": backend.zeros(p.shape, p.dtype),
                                    "exp_avg_sq": backend.zeros(p.shape, p.dtype)}
            s = self.state[name]
            backend.adam_step(p, grads[name], s["exp_avg"], s["exp_avg_sq"], self.lr,
                              self.betas[0], self.betas[1], self.eps, self.weight_decay, t)
        self.steps = t


OPTIMIZERS = {"SGD": SGD, "Adam": Adam}


def optimizer_from_state_dict(sd, backend=None):
    """Rebuild an optimizer (type, config and buffers) from :meth:`Optimizer.state_dict`."""
    cls = OPTIMIZERS.get(sd.get("type"))
    if cls is None:
        raise ValueError(f"unknown optimizer type {sd.get('type')!r}; known: {', '.join(OPTIMIZERS)}")
    opt = cls(**sd["config"])
    opt.load_state_dict(sd, backend)
    return opt


def step_norms(backend, dh):
    """[T,B,H] device array -> list of T floats: the L2 norm of every step's dL/dh_t (the
    gradient diagnostics of ``Trainer(record_grad_norms=True)``)."""
    xp = backend.xp
    norms = xp.sqrt((dh.astype(np.float64) ** 2).sum(axis=(1, 2)))
    return [float(v) for v in backend.to_host(norms)]


def global_grad_norm(grads, backend):
    """sqrt of the sum of squares of every element of every gradient (float64, a Python float)."""
    return math.sqrt(backend.sum_of_squares(list(grads)))


def clip_grad_norm_(grads, max_norm, backend, total_norm=None):
    """Scale all gradients in place so their global L2 norm is at most ``max_norm``.

    Identical to ``torch.nn.utils.clip_grad_norm_``: total = ||all grads||_2,
    coef = max_norm / (total + 1e-6), and the gradients are multiplied by min(coef, 1).
    ``total_norm`` may be passed when already computed. Returns the norm before clipping.
    """
    grads = list(grads)
    if total_norm is None:
        total_norm = global_grad_norm(grads, backend)
    coef = float(max_norm) / (total_norm + 1e-6)
    if coef < 1.0:
        backend.scale_(grads, coef)
    return total_norm


# ------------------------------------------------------------------------------------------
# Learning-rate schedules: lr(epoch) from the base lr; epoch counts from 0.


class Schedule:
    """Base class. ``schedule(base_lr, epoch)`` -> lr for that epoch (0-based).

    ``on_validation(loss)`` is called by the trainer after every validation (the default ignores
    it); ``state`` / ``load_state`` hold what a schedule learnt from them (JSON-able)."""

    def __call__(self, base_lr, epoch):
        raise NotImplementedError

    @property
    def config(self):
        """Constructor keyword arguments (JSON-able)."""
        return {}

    def on_validation(self, loss):
        """Take note of a validation loss (a float, possibly NaN)."""

    @property
    def state(self):
        """What the schedule learnt from validations (JSON-able); {} for a stateless one."""
        return {}

    def load_state(self, state):
        if state:
            raise ValueError(f"{type(self).__name__} has no state; got {state!r}")

    def state_dict(self):
        sd = {"type": type(self).__name__, "config": self.config}
        if self.state:
            sd["state"] = self.state
        return sd


class ConstantLR(Schedule):
    """The base learning rate in every epoch."""

    def __call__(self, base_lr, epoch):
        return base_lr


class StepDecay(Schedule):
    """Multiply the lr by ``factor`` every ``every`` epochs, from epoch ``start`` (0-based) on.

    lr(epoch) = base_lr * factor ** n,  n = 0 before ``start``, else (epoch - start) // every + 1.
    Zaremba et al.'s PTB recipe ("after 4 epochs, halve the lr every epoch"):
    ``StepDecay(factor=0.5, every=1, start=4)`` -- epochs 0..3 at base_lr, epoch 4 at base/2, ...
    With every=1 and start=E, counting epochs from 1 instead: lr(e) = base_lr * factor ** max(0, e - E)
    (``bptt train --lr-decay F --lr-decay-after E``).
    """

    def __init__(self, factor=0.5, every=1, start=0):
        if not 0 < factor <= 1:
            raise ValueError(f"factor must be in (0, 1]; got {factor!r}")
        if isinstance(every, bool) or not isinstance(every, (int, np.integer)) or every < 1:
            raise ValueError(f"every must be an integer >= 1; got {every!r}")
        if isinstance(start, bool) or not isinstance(start, (int, np.integer)) or start < 0:
            raise ValueError(f"start must be an integer >= 0; got {start!r}")
        self.factor, self.every, self.start = float(factor), int(every), int(start)

    @property
    def config(self):
        return {"factor": self.factor, "every": self.every, "start": self.start}

    def __call__(self, base_lr, epoch):
        n = 0 if epoch < self.start else (epoch - self.start) // self.every + 1
        return base_lr * self.factor ** n


class ExponentialDecay(Schedule):
    """lr(epoch) = base_lr * gamma ** epoch (torch.optim.lr_scheduler.ExponentialLR per epoch)."""

    def __init__(self, gamma):
        if not 0 < gamma <= 1:
            raise ValueError(f"gamma must be in (0, 1]; got {gamma!r}")
        self.gamma = float(gamma)

    @property
    def config(self):
        return {"gamma": self.gamma}

    def __call__(self, base_lr, epoch):
        return base_lr * self.gamma ** epoch


class PlateauDecay(Schedule):
    """Divide the lr by ``divide_by`` after every validation whose loss is not below the best so far.

    PyTorch's word_language_model rule (``if val_loss < best_val_loss: best_val_loss = val_loss
    else: lr /= 4.0``), with ``divide_by=4``: lr = base_lr / divide_by ** n, n = the validations so
    far that did not improve on the best before them (the first one always improves; a NaN loss
    never does). The new lr applies from the next update on (``bptt train --lr-plateau F``).
    """

    def __init__(self, divide_by=4.0):
        if isinstance(divide_by, bool) or not isinstance(divide_by, (int, float, np.floating, np.integer)) \
                or not 1 <= divide_by < math.inf:
            raise ValueError(f"divide_by must be a finite number >= 1; got {divide_by!r}")
        self.divide_by = float(divide_by)
        self.best = None         # lowest validation loss so far
        self.reductions = 0      # validations that did not improve on the best before them

    @property
    def config(self):
        return {"divide_by": self.divide_by}

    def on_validation(self, loss):
        loss = float(loss)
        if math.isfinite(loss) and (self.best is None or loss < self.best):
            self.best = loss
        else:
            self.reductions += 1

    @property
    def state(self):
        return {"best": self.best, "reductions": self.reductions}

    def load_state(self, state):
        best = state.get("best")
        self.best = None if best is None else float(best)
        self.reductions = int(state.get("reductions", 0))

    def __call__(self, base_lr, epoch):
        return base_lr / self.divide_by ** self.reductions


SCHEDULES = {"ConstantLR": ConstantLR, "StepDecay": StepDecay, "ExponentialDecay": ExponentialDecay,
             "PlateauDecay": PlateauDecay}


def schedule_from_state_dict(sd):
    """Rebuild a schedule (its config and state) from :meth:`Schedule.state_dict`."""
    cls = SCHEDULES.get(sd.get("type"))
    if cls is None:
        raise ValueError(f"unknown schedule type {sd.get('type')!r}; known: {', '.join(SCHEDULES)}")
    schedule = cls(**sd["config"])
    schedule.load_state(sd.get("state") or {})
    return schedule
