"""``mpiexec -n N python tests/mpi/train.py CONFIGS.json OUT``: train each run of CONFIGS (name ->
configuration of setups.py, plus optional "resume": a checkpoint to continue from, and "save":
where to checkpoint at the end) on the N ranks, with the replicas' checksum after every update;
rank 0 writes OUT/<name>.npz (setups.result). A run that fails writes OUT/<name>.err<rank> (the
one-line error) on every rank instead, and the next run goes on."""

import json
import os
import sys

import numpy as np

import bptt
import setups
from bptt.distributed import mpi


def main(configs_path, out):
    with open(configs_path) as f:
        runs = json.load(f)
    comm = mpi()
    for name, cfg in runs.items():
        try:
            trainer = None
            if cfg.get("resume"):
                setups.build(cfg)                                   # the backend
                trainer = bptt.Trainer.from_checkpoint(cfg["resume"], comm=comm, check_replicas=True)
            trainer, data, fit = setups.build(cfg, comm, check_replicas=True, trainer=trainer)
            trainer.fit(data, **fit)
            if cfg.get("save"):
                trainer.save_checkpoint(cfg["save"])
        except Exception as e:                                     # noqa: BLE001 -- the test reads it
            with open(os.path.join(out, f"{name}.err{comm.rank}"), "w") as f:
                f.write(f"{type(e).__name__}: {' '.join(str(e).split())}")
            continue
        if comm.rank == 0:
            np.savez(os.path.join(out, f"{name}.npz"), **setups.result(trainer))


if __name__ == "__main__":
    main(*sys.argv[1:])
