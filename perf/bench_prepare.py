"""Corpora larger than memory: ``bptt prepare`` of a generated text file of a few GB (peak RSS,
MB/s), then ``bptt train --data DIR --max-steps 50`` on it against the same run on a 1 MB
corpus (peak RSS: the memory map must not bring the token file into memory).

    python perf/bench_prepare.py                  # 2 GB under /tmp (1 GB if less than 6 GB free)
    python perf/bench_prepare.py --gb 0.2 --tmp /var/tmp

The text: the lines of the built-in corpus (the Python help topics), shuffled, again and again.
Every command runs as a child process (``python -m bptt ...``); its peak RSS is the child's own
``ru_maxrss`` (``os.wait4``). The generated files are deleted at the end (``--keep`` keeps them).
Prints a table and writes perf/results/bench_prepare-<time>.json.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _harness import REPO_DIR, child_env, machine_info, save_json, table  # noqa: E402

# the training run: a small char-level model, 50 updates; no sample, no timed checkpoints
TRAIN = ["--max-steps", "50", "--hidden-size", "64", "--embedding-size", "16", "--batch-size", "32",
         "--k1", "32", "--sample-length", "0", "--save-every-minutes", "0", "--json"]
VALID_FRACTION = "0.0005"      # 1 M validation tokens of 2 GB: the run's final evaluation stays short


def write_text(path, n_bytes, seed=0):
    """About ``n_bytes`` of UTF-8 text: the default corpus's lines in a fresh random order, again
    and again, written a block at a time."""
    from bptt.data import default_corpus_text
    lines = default_corpus_text().splitlines(keepends=True)
    rng = np.random.default_rng(seed)
    written = 0
    with open(path, "w", encoding="utf-8") as f:
        while written < n_bytes:
            block = "".join(lines[i] for i in rng.permutation(len(lines))).encode("utf-8")[: n_bytes - written]
            f.write(block.decode("utf-8", "ignore"))
            written += len(block)
    return os.path.getsize(path)


def run(argv, env):
    """Run ``python -m bptt argv``: (wall s, the last JSON line of its stdout)."""
    began = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "bptt", *map(str, argv)], cwd=REPO_DIR, env=env,
                          capture_output=True, text=True)
    wall = time.perf_counter() - began
    if proc.returncode != 0:
        raise RuntimeError(f"bptt {argv[0]} failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
    return wall, json.loads(proc.stdout.strip().splitlines()[-1])


def measured(argv, env):
    """:func:`run` from a fresh Python process, whose RUSAGE_CHILDREN ru_maxrss (the largest of
    its children's peaks) is then that one command's peak RSS: {"wall_s", "peak_rss_mb", "result"}."""
    code = ("import json, resource, sys\n"
            f"sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r})\n"
            "import bench_prepare\n"
            f"wall, result = bench_prepare.run({argv!r}, bench_prepare.child_env())\n"
            "rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024\n"
            "print(json.dumps({'wall_s': wall, 'peak_rss_mb': rss, 'result': result}))\n")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=REPO_DIR)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr.strip()[-2000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gb", type=float, default=2.0, help="size of the generated text (default 2)")
    parser.add_argument("--tmp", default="/tmp", help="where the text and the corpus go (default /tmp)")
    parser.add_argument("--level", choices=("char", "word"), default="char")
    parser.add_argument("--keep", action="store_true", help="keep the generated files")
    args = parser.parse_args()

    free_gb = shutil.disk_usage(args.tmp).free / 1e9
    gb = args.gb
    if gb >= 2 and free_gb < 6:
        gb = 1.0
        print(f"only {free_gb:.1f} GB free under {args.tmp}: using a 1 GB text instead of {args.gb:g} GB")
    env = child_env()
    work = tempfile.mkdtemp(prefix="bench_prepare-", dir=args.tmp)
    rows, record = [], {"machine": machine_info(2), "level": args.level, "train_flags": TRAIN,
                        "valid_fraction": VALID_FRACTION, "free_gb_before": round(free_gb, 1)}
    try:
        big, small = os.path.join(work, "big.txt"), os.path.join(work, "small.txt")
        began = time.perf_counter()
        size = write_text(big, int(gb * 1e9))
        write_text(small, 10 ** 6, seed=1)
        print(f"generated {size / 1e9:.2f} GB of text in {time.perf_counter() - began:.0f} s")
        record["text_bytes"] = size
        for name, text in (("big", big), ("small", small)):
            out = os.path.join(work, f"corpus-{name}")
            m = measured(["prepare", "--data", text, "--out", out, "--level", args.level,
                          "--valid-fraction", VALID_FRACTION, "--json"], env)
            mb = os.path.getsize(text) / 1e6
            record[f"prepare_{name}"] = m
            rows.append([f"prepare {mb:,.0f} MB", f"{m['wall_s']:.1f}", f"{mb / m['wall_s']:.1f}",
                         f"{m['peak_rss_mb']:.0f}", f"{m['result']['train_tokens']:,} tokens"])
        for name, data in (("big", os.path.join(work, "corpus-big")), ("small", os.path.join(work, "corpus-small")),
                           ("small text file", small)):
            level = ["--level", args.level] if data == small else []
            m = measured(["train", "--data", data, *level, "--out", os.path.join(work, f"run-{len(rows)}"), *TRAIN],
                         env)
            record[f"train_{name.replace(' ', '_')}"] = m
            rows.append([f"train 50 steps, {name}", f"{m['wall_s']:.1f}", "", f"{m['peak_rss_mb']:.0f}",
                         f"val loss {m['result']['val_loss']:.3f}"])
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(table(["command", "wall s", "MB/s", "peak RSS MiB", ""], rows))
    big_rss, small_rss = record["train_big"]["peak_rss_mb"], record["train_small"]["peak_rss_mb"]
    print(f"prepare peak RSS {record['prepare_big']['peak_rss_mb']:.0f} MiB (limit 300); train on "
          f"{size / 1e9:.2f} GB vs 1 MB: {big_rss - small_rss:+.0f} MiB (limit 100)")
    print(f"results: {save_json('bench_prepare', record)}")


if __name__ == "__main__":
    main()
