"""The commands: ``bptt train``, ``bptt eval``, ``bptt sample``. Each takes the parsed
arguments and returns the exit status; NumPy, the kernels and tqdm load here, when a command runs."""

import json
import math
import os
import signal
import sys
import time

from bptt.cli.arguments import (KEEP, SAVE_EVERY_MINUTES, UsageError, check_resume, flag, resolve_prepare,
                                resolve_train)
from bptt.cli.build import (build_model, build_trainer, count_id, eval_batch, is_prepared, load_corpus,
                            prepare_data, prepared_eval_ids, run_vocab, task_validation, vocab_of)
from bptt.cli.build import validation_batch
from bptt.cli.progress import Progress
from bptt.cli.runs import (StepLog, append_jsonl, checkpoint_path, jsonable, new_run_dir, newest_checkpoint,
                           read_meta, resume_command)


def select_backend(name, comm=None):
    """The backend ``name`` (None: the default one); with ``comm`` (data-parallel) a GPU
    backend's GPU is this rank's local_rank."""
    import bptt
    if name is not None:
        bptt.use_backend(name)
    backend = bptt.get_backend()
    if comm is not None:
        comm.use_local_device(backend)
    return backend


def _finite(x):
    return None if x is None or not math.isfinite(x) else float(x)


def _num(x, digits=4):
    return "nan" if x is None else f"{x:.{digits}f}"


def _fmt_duration(seconds):
    seconds = int(seconds)
    return f"{seconds // 60}:{seconds % 60:02d}"


def cmd_train(args):
    cfg = resolve_train(args)
    comm = distributed(cfg)
    if comm is None:
        return _train(args, cfg, None)
    from bptt.data_parallel import Ranks
    ranks = Ranks(comm)     # an error before the ranks meet is raised on all; after, one rank's aborts all
    with ranks.guard(agreed=(KeyboardInterrupt, FloatingPointError)):
        return _train(args, cfg, ranks)


def distributed(cfg):
    """None, or with ``--distributed mpi`` the communicator of mpiexec's ranks (DistributedError
    without mpi4py; UsageError for processes of mpiexec without it). Ranks other than 0 print
    nothing from then on (a rank that fails writes its report to its own stderr)."""
    from bptt.distributed import launched_processes, mpi
    if cfg.get("distributed") is None:
        if launched_processes() > 1:
            raise UsageError(f"started by mpiexec as one of {launched_processes()} processes without --distributed "
                             f"mpi: each would train alone into the same --out; add --distributed mpi")
        return None
    comm = mpi()
    if comm.rank != 0:
        sys.stdout = sys.stderr = open(os.devnull, "w")
    return comm


def check_ranks(cfg, comm):
    """UsageError where --batch-size is not a multiple of the processes (before the run's files
    are touched)."""
    if comm is not None and cfg["batch_size"] % comm.size:
        raise UsageError(f"--batch-size {cfg['batch_size']} is not a multiple of the {comm.size} processes of "
                         f"--distributed mpi: each trains batch-size/{comm.size} of the streams")


def check_memory(trainer, data, batch_size):
    """A --memory budget below the smallest feasible one for the run's windows: ValueError (one
    line naming that smallest budget) before the run directory or a checkpoint is written. fit
    plans every window before its first update, so a fit with nothing left to do (its epochs
    and max_steps already reached) plans them and returns."""
    if isinstance(trainer.memory, int):
        trainer.fit(data.train, batch_size, epochs=trainer.epoch, max_steps=trainer.step)


def memory_text(memory):
    """The --memory setting as the model line names it ("" for every activation kept)."""
    if memory is None:
        return ""
    return f", memory {memory}" if memory == "sqrt" else f", memory budget {memory / 2 ** 20:.4g} MiB"


def _train(args, cfg, ranks):
    """``bptt train`` in one process (``ranks`` None) or on the ranks of a
    :class:`bptt.data_parallel.Ranks`: each reads the data and the checkpoint and trains its
    streams; rank 0 alone makes the run directory and writes its files."""
    comm = None if ranks is None else ranks.comm
    rank0 = comm is None or comm.rank == 0
    import warnings
    # overflow warnings of a diverging run would bury the trainer's one-line non-finite error
    warnings.filterwarnings("ignore", category=RuntimeWarning, module="bptt")
    out = cfg.get("out") or os.path.join("runs", args.task or "default")
    if args.resume:
        if args.overwrite:
            raise UsageError("--overwrite starts a new run and --resume continues one: give one of them")
        more = cfg.get("max_steps") is not None or cfg.get("epochs") is not None
        ckpt_path, meta, skipped = newest_checkpoint(out)
        cfg = check_resume(cfg, meta)    # flag conflicts first, before any backend is chosen
        check_ranks(cfg, comm)
        for bad, error in skipped:       # newer checkpoints that are damaged (a disk error, a crash)
            print(f"warning: {error}; resuming from {ckpt_path}", file=sys.stderr)
        backend = select_backend(cfg.get("backend"), comm)
        import bptt
        trainer = bptt.Trainer.from_checkpoint(ckpt_path, comm=comm)
        model = trainer.model
        trainer.record_grad_norms = trainer.record_grad_norms or bool(cfg.get("grad_norms"))
        trainer.memory = cfg.get("memory")    # the run's, or --memory given again (same results)
        data = prepare_data(cfg, run_vocab(meta, ckpt_path, model))
        check_memory(trainer, data, cfg["batch_size"])
    else:
        check_ranks(cfg, comm)
        data = prepare_data(cfg)         # data errors first, before any backend is chosen
        backend = select_backend(cfg.get("backend"), comm)
        import bptt
        model = build_model(cfg, len(data.vocab) if data.vocab else None)
        trainer = build_trainer(cfg, model, comm)
        check_memory(trainer, data, cfg["batch_size"])
        if rank0:
            new_run_dir(out, cfg.get("overwrite"))     # refuses a directory that holds a run
    task = cfg.get("task")
    per_epoch = trainer.updates_per_epoch(data.train, cfg["batch_size"])

    # fit's epochs and max_steps are totals over the trainer's life. A run's target (the update
    # and epoch it stops at) travels in its checkpoints: --resume alone continues to it, so a run
    # stopped any number of times ends where (and with the weights) an uninterrupted one would;
    # --resume with --max-steps or --epochs trains that many more updates or epochs (an
    # unfinished epoch counts as one) and makes that the target.
    target = meta.get("target") if args.resume and not more else None
    if target:
        max_steps, epochs = target["max_steps"], target["epochs"]
    else:
        max_steps = trainer.step + cfg["max_steps"] if cfg.get("max_steps") else None
        epochs = trainer.epoch + cfg["epochs"]
    done = trainer.history["epoch"].count(trainer.epoch) if trainer.position is not None else 0
    total = max(0, min(per_epoch * (epochs - trainer.epoch) - done,
                       math.inf if max_steps is None else max_steps - trainer.step))
    tbptt = "full BPTT" if cfg["k1"] is None else f"TBPTT k1={cfg['k1']} k2={cfg['k2']}"
    err = sys.stderr
    print(data.line, file=err)
    fb = f", forget bias {cfg['forget_bias']}" if cfg["cell"] == "lstm" and cfg.get("forget_bias") else ""
    bi = "bidirectional " if cfg.get("bidirectional") else ""
    memory = memory_text(cfg.get("memory"))
    print(f"model: {bi}{cfg['cell']} {cfg['num_layers']}x{cfg['hidden_size']}{fb}, {tbptt}, batch {cfg['batch_size']}, "
          f"{cfg['optimizer']} lr {cfg['lr']}, clip {cfg['clip']}{memory}, backend {backend.NAME}, "
          f"{'resuming' if args.resume else 'run dir'} {out}", file=err)

    compiles = backend.NAME in ("cpu", "cuda")       # Numba: compiled on first use, then cached
    notice = ("(no update yet: the first run on a machine compiles the kernels, about 20 s; "
              "later runs load them from the cache)") if compiles else None
    tokens_per_update = data.tokens_per_epoch / per_epoch if data.tokens_per_epoch and per_epoch else None
    progress = Progress(total, start_step=trainer.step, tokens_per_update=tokens_per_update, wait_notice=notice)
    meta = {"config": {k: v for k, v in cfg.items()
                       if k not in ("json", "resume", "overwrite", "backend", "out", "distributed")},
            "vocab": data.vocab.to_json() if data.vocab else None, "bptt_version": bptt.__version__,
            "target": {"max_steps": max_steps, "epochs": epochs}}
    from bptt.checkpointing import CheckpointCallback
    from bptt.interrupts import Preempted
    if ranks is not None:
        ranks.meet()          # every rank is ready (or all raise where one failed); collectives from here
    saver = CheckpointCallback(trainer, out, every_updates=cfg.get("save_every"),
                               every_minutes=cfg.get("save_every_minutes", SAVE_EVERY_MINUTES),
                               keep=cfg.get("keep", KEEP), meta=meta)
    ckpt = saver.save()       # update 0 of a new run (from now on --resume finds the run), or the new target
    # Ctrl-C and SIGTERM: the trainer commits each update together with its position in the data
    # while holding both back, so the KeyboardInterrupt (Preempted for SIGTERM) out of fit leaves
    # it at the last finished update and the checkpoint saved below is consistent. A second
    # signal (while saving) ends the process at once; checkpoint files are replaced atomically.
    interrupted = None
    # rank 0 shows the progress and logs the steps; every rank takes part in the checkpoints
    callbacks = (progress, StepLog(out, every=max(1, per_epoch // 50)), saver) if rank0 else (saver,)
    try:
        # validation at every epoch end (and every --eval-every updates): progress line, metrics.jsonl
        trainer.fit(data.train, cfg["batch_size"], epochs=epochs, max_steps=max_steps, validation=data.valid,
                    eval_every=cfg.get("eval_every"), patience=cfg.get("patience"),
                    validation_batch_size=validation_batch(cfg, data.valid), callbacks=callbacks)
    except KeyboardInterrupt as e:
        interrupted = e
    finally:
        progress.close()
    ckpt = saver.save()
    if interrupted is not None:
        how = f"stopped by {signal.Signals(interrupted.signum).name}" if isinstance(interrupted, Preempted) \
            else "interrupted"
        print(f"{how} after update {trainer.step}: checkpoint saved to {ckpt}; continue with: "
              f"{resume_command(out)}", file=err)
        return 128 + interrupted.signum if isinstance(interrupted, Preempted) else 130
    wall = progress.elapsed()
    vs = trainer.validation_state
    if trainer.stopped_early:
        print(f"stopped early: {vs['since_best']} validations in a row without a lower validation loss "
              f"(--patience {cfg['patience']}); the best, {_num(vs['best_loss'])}, was after update {vs['best_step']}",
              file=err)

    # tokens_per_s: the updates after this process's first (compiling), validation left out;
    # train_loss: the mean loss of the last (up to) 50 updates
    summary = {"command": "train", "task": task or "lm", "steps": int(trainer.step),
               "updates_this_run": len(progress.losses), "tokens": int(round(progress.tokens)),
               "tokens_per_s": round(progress.tokens_per_s(), 1), "wall_s": round(wall, 2),
               "train_loss": _finite(progress.recent_loss()), "backend": backend.NAME,
               "out": out, "checkpoint": ckpt}
    curve = trainer.history.get("val_loss", [])
    summary.update(val_curve_length=len(curve), last_val_loss=_finite(curve[-1]) if curve else None,
                   best_val_loss=_finite(vs["best_loss"]), best_val_step=vs["best_step"],
                   stopped_early=bool(trainer.stopped_early), lr=float(trainer.optimizer.lr))
    if task is None:
        metrics = trainer.evaluate(data.valid, eval_batch(len(data.valid)))
        summary.update(val_loss=_finite(metrics["loss"]), val_perplexity=_finite(metrics["perplexity"]),
                       val_bits_per_token=_finite(metrics["bits_per_token"]))
    else:
        summary.update(task_metrics(cfg, model, trainer, data.valid))
    if cfg.get("grad_norms") and rank0:
        summary["grad_norms_file"] = write_grad_norms(trainer, out)

    window = min(len(progress.losses), 50)
    if window:
        lines = [f"done: {summary['steps']} steps in {_fmt_duration(wall)} ({summary['tokens_per_s']:,.0f} tok/s "
                 f"training{', first update excluded' if len(progress.losses) > 1 else ''}), "
                 f"train loss {_num(summary['train_loss'])} (mean of the last {window} updates)"]
    else:
        lines = [f"done: {summary['steps']} steps, none in this run (the run had reached its end"
                 f"{' or stopped early' if trainer.stopped_early else ''})"]
    if task is None:
        lines.append(f"validation: loss {_num(summary['val_loss'])}, perplexity {_num(summary['val_perplexity'])}, "
                     f"{_num(summary['val_bits_per_token'])} bits/{cfg['level']}")
    elif "recall_accuracy" in summary:
        lines.append(f"validation: loss {_num(summary['val_loss'])}, recall accuracy "
                     f"{summary['recall_accuracy']:.3f} (chance {summary['chance_accuracy']:.3f})")
    elif "accuracy" in summary:
        lines.append(f"validation: loss {_num(summary['val_loss'])}, accuracy "
                     f"{summary['accuracy']:.3f} (chance {summary['chance_accuracy']:.3f})")
    else:
        lines.append(f"validation: MSE {summary['val_mse']:.4f} (baseline of answering 1: "
                     f"{summary['baseline_mse']:.4f})")
    if curve:
        lines.append(f"validation curve: {len(curve)} points, last {_num(summary['last_val_loss'])}, best "
                     f"{_num(summary['best_val_loss'])} after update {summary['best_val_step']}; lr now {summary['lr']:.4g}")
    lines.append(f"checkpoint: {ckpt}")
    print("\n".join(lines), file=err if args.json else sys.stdout)

    if not rank0:
        return 0
    if task is None and cfg.get("sample_length"):
        from bptt.sampling import sample
        text = sample(model, data.vocab, cfg["sample_length"], temperature=0.8, seed=cfg["seed"])
        summary["sample"] = text
        print("--- sample (temperature 0.8) ---\n" + text + "\n---", file=err if args.json else sys.stdout)
    append_jsonl(out, {"event": "train_end", "time": time.time(), **summary, "config": meta["config"]})
    if args.json:
        print(json.dumps(summary, sort_keys=True))
    return 0


def task_metrics(cfg, model, trainer, valid_data):
    """Validation metrics of a task model: val_loss (the trainer's: cross-entropy per recalled
    symbol, or MSE) and the task's scores of the model's outputs (:data:`bptt.tasks.TASK_TABLE`)."""
    from bptt.tasks import EVAL_BATCH, predict, task
    inputs, targets, *lengths = valid_data          # lengths: [n] for a task of variable lengths
    loss = trainer.evaluate(valid_data, min(len(inputs), EVAL_BATCH))["loss"]
    outputs = predict(model, inputs, lengths=lengths[0] if lengths else None)
    return {"val_loss": _finite(loss), **task(cfg["task"]).scores(outputs, targets)}


def write_grad_norms(trainer, out):
    """Write the trainer's gradient diagnostics (per update: ||dL/dh_t|| of every step of the
    backpropagated window, per level, and every parameter's gradient norm; see
    :mod:`bptt.diagnostics`) to ``grad_norms.json``, and where matplotlib is installed their plot
    to ``grad_norms.png``. Returns the JSON path."""
    from bptt import diagnostics
    path = diagnostics.save_grad_norms(trainer.history, os.path.join(out, "grad_norms.json"))
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return path
    if trainer.history.get("grad_diagnostics"):
        plt.close(diagnostics.plot_grad_norms(trainer.history, os.path.join(out, "grad_norms.png")))
    return path


def _load_run(run_dir, backend_name, check=None):
    """(model, meta, backend) of the run in ``run_dir``; ``check(meta)`` runs before a backend is
    chosen or the model built, so flag errors come first."""
    path = checkpoint_path(run_dir)
    meta = read_meta(path)
    if not isinstance(meta.get("config"), dict):
        raise UsageError(f"{path}: its meta's config is not a JSON object")
    if check is not None:
        check(meta)
    run_vocab(meta, path)             # a hand-edited vocabulary fails before a backend is chosen
    backend = select_backend(backend_name)
    import bptt
    from bptt.checkpoint import load_model
    model, _ = load_model(path, expect=bptt.SequenceModel if meta["config"].get("task") else bptt.LanguageModel)
    run_vocab(meta, path, model)
    return model, meta, backend


def cmd_eval(args):
    from bptt.data import Corpus, read_text
    from bptt.prepared import open_prepared
    # file errors before the model loads
    prepared = text = None
    if is_prepared(args.data):
        for name in ("max_chars", "encoding", "decode_errors"):
            if getattr(args, name) is not None:
                raise UsageError(f"{flag(name)} is for text files; {args.data} is a prepared corpus")
        prepared = open_prepared(args.data)
    elif args.data is not None:
        text = read_text(args.data, args.max_chars, args.encoding or "utf-8", args.decode_errors or "strict")

    def check(meta):
        task = meta["config"].get("task")
        if task is not None and args.data is not None:
            raise UsageError(f"--data is for language models; {args.run_dir} holds a --task {task} model")

    model, meta, backend = _load_run(args.run_dir, args.backend, check)
    cfg = meta["config"]
    import bptt
    trainer = bptt.Trainer(model, bptt.SGD(0.0), k1=cfg["k1"], k2=cfg["k2"])
    if cfg.get("task") is not None:
        metrics = task_metrics(cfg, model, trainer, task_validation(cfg))
        metrics["loss"] = metrics.pop("val_loss")
        source = f"task {cfg['task']} (the held-out sequences of training)"
    else:
        vocab = run_vocab(meta, args.run_dir, model)
        if prepared is not None:
            ids, source = prepared_eval_ids(prepared, vocab)
        elif text is not None:
            ids, source = Corpus(text, vocab.level, 0.0, args.data, vocab).train, args.data
        else:
            ids, source = load_corpus(cfg, vocab).valid, "held-out part of the training corpus"
        m = trainer.evaluate(ids, args.batch_size or eval_batch(len(ids)))
        metrics = {"loss": float(m["loss"]), "perplexity": float(m["perplexity"]),
                   "bits_per_token": float(m["bits_per_token"]), "tokens": int(len(ids))}
        unk = count_id(ids, vocab.unk_id)
        if unk:
            metrics["unk_tokens"] = unk
    summary = {"command": "eval", "run_dir": args.run_dir, "data": source, "backend": backend.NAME,
               **{k: jsonable(v) for k, v in metrics.items()}}
    append_jsonl(args.run_dir, {"event": "eval", "time": time.time(), **summary})
    text = ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items())
    print(f"{source}: {text}", file=sys.stderr if args.json else sys.stdout)
    if args.json:
        print(json.dumps(summary, sort_keys=True))
    return 0


def cmd_sample(args):

    def check(meta):
        if meta["config"].get("task") is not None or not meta.get("vocab"):
            raise UsageError(f"{args.run_dir} holds a --task model; sampling needs a language model")

    model, meta, _ = _load_run(args.run_dir, args.backend, check)
    from bptt.sampling import sample
    vocab = run_vocab(meta, args.run_dir, model)
    text = sample(model, vocab, args.length, temperature=args.temperature, top_k=args.top_k,
                  prime=args.prime, seed=args.seed)
    if args.json:
        print(text, file=sys.stderr)
        print(json.dumps({"command": "sample", "text": text, "length": args.length,
                          "temperature": args.temperature, "top_k": args.top_k, "seed": args.seed}))
    else:
        print(text)
    return 0


def cmd_plot(args):
    from bptt.cli.plot import plot_run
    print(plot_run(args.run_dir, args.output))
    return 0


def cmd_prepare(args):
    """``bptt prepare --data FILE --out DIR``: tokenize FILE into a prepared corpus (progress and
    MB/s on stderr); ``bptt prepare --verify DIR``: read one whole and check it."""
    resolve_prepare(args)
    from bptt.cli.progress import byte_bar
    from bptt.prepared import open_prepared, prepare
    began = time.monotonic()
    if args.verify is not None:
        corpus = open_prepared(args.verify, verify=True, progress=byte_bar)
        read = sum(entry["bytes"] for entry in corpus.meta["splits"].values())
    else:
        vocab = vocab_of(args.vocab) if args.vocab is not None else None
        corpus = prepare(args.data, args.out, level=args.level or (vocab.level if vocab else "char"),
                         valid_fraction=args.valid_fraction, valid_path=args.valid, vocab=vocab,
                         encoding=args.encoding or "utf-8", errors=args.decode_errors or "strict", progress=byte_bar)
        read = corpus.meta["source"]["bytes"] + (corpus.meta["valid_source"] or {"bytes": 0})["bytes"]
    seconds = time.monotonic() - began
    meta = corpus.meta
    splits = {split: entry["tokens"] for split, entry in meta["splits"].items()}
    summary = {"command": "prepare", "out": corpus.source, "verified": args.verify is not None,
               "level": meta["level"], "vocab_size": meta["vocab_size"], "dtype": meta["dtype"],
               "train_tokens": splits["train"], "valid_tokens": splits.get("valid", 0),
               "input_bytes": read, "seconds": round(seconds, 2),
               "mb_per_s": round(read / 1e6 / max(seconds, 1e-9), 1)}
    what = "verified" if args.verify is not None else "prepared"
    valid = f"{splits['valid']:,} valid" if "valid" in splits else "no validation"
    print(f"{what} {corpus.source}: {meta['level']} level, vocab {meta['vocab_size']:,}, {splits['train']:,} train / "
          f"{valid} tokens ({meta['dtype']}); {read / 1e6:,.1f} MB {'of token files' if args.verify else 'of text'} "
          f"in {seconds:.1f} s ({summary['mb_per_s']:,.1f} MB/s)", file=sys.stderr if args.json else sys.stdout)
    if args.json:
        print(json.dumps(summary, sort_keys=True))
    return 0


COMMANDS = {"train": cmd_train, "eval": cmd_eval, "sample": cmd_sample, "plot": cmd_plot, "prepare": cmd_prepare}
