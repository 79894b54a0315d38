"""Sampling text from a trained LanguageModel (temperature, top-k, a priming text, a seed).

The model first reads the priming text (one forward call over all its tokens, from a zero
state); the recurrent state it ends in is carried into generation, which then feeds each drawn
token back one step at a time. Prime symbols the vocabulary has never seen are read as
``<unk>``; at char level ``<unk>`` is never generated (it never occurs in the training text).
Without a prime, generation starts from a line break (``"\\n"`` at char level when the
vocabulary has it, ``<eos>`` at word level, else a random token); that start token is not part
of the output.
"""

import numpy as np

from bptt.data import EOS, tokenize


def _next_token(logits, temperature, top_k, rng, banned=None):
    """Draw one id from logits [V] (host float): softmax(logits / temperature), restricted to the
    ``top_k`` largest when given; temperature 0 means the most likely id (greedy). ``banned``:
    an id never drawn (None: none)."""
    logits = np.array(logits, dtype=np.float64)
    if banned is not None:
        logits[banned] = -np.inf
    if temperature == 0:
        return int(np.argmax(logits))
    z = logits / temperature
    if top_k is not None and top_k < len(z):
        cutoff = np.partition(z, -top_k)[-top_k]
        z = np.where(z >= cutoff, z, -np.inf)
    p = np.exp(z - z.max())
    p /= p.sum()
    return int(min(np.searchsorted(np.cumsum(p), rng.random() * p.sum(), side="right"), len(p) - 1))


def _host(model, array):
    backend = getattr(model, "backend", None)
    if backend is None:
        import bptt
        backend = bptt.get_backend()
    return backend.to_host(array)


def sample_ids(model, vocab, length, temperature=1.0, top_k=None, prime="", seed=None):
    """Generate ``length`` token ids (int64 [length]) after reading ``prime`` (str).

    model: a LanguageModel whose vocabulary is ``vocab``; temperature >= 0 (0 = greedy);
    top_k: None or an int >= 1; seed: for ``numpy.random.default_rng``.
    """
    if isinstance(length, bool) or not isinstance(length, (int, np.integer)) or length < 0:
        raise ValueError(f"length must be an integer >= 0; got {length!r}")
    if not temperature >= 0:
        raise ValueError(f"temperature must be >= 0; got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 1):
        raise ValueError(f"top_k must be None or an integer >= 1; got {top_k!r}")
    rng = np.random.default_rng(seed)
    prime_ids = vocab.encode_tokens(tokenize(prime, vocab.level)) if prime else np.empty(0, np.int64)
    if vocab.level == "word" and prime and not prime.endswith("\n"):
        prime_ids = prime_ids[:-1]   # the tokenizer closes the last line; the prime text did not
    if len(prime_ids) == 0:
        start = "\n" if vocab.level == "char" else EOS
        start_id = vocab.index.get(start)
        if start_id is None:
            start_id = int(rng.integers(len(vocab)))
        prime_ids = np.array([start_id], dtype=np.int64)
    # char level: <unk> never occurs in the training text (the vocabulary holds every character
    # of it), so it is never generated; word level keeps it (PTB-style corpora contain "<unk>")
    banned = vocab.unk_id if vocab.level == "char" else None
    out = np.empty(length, dtype=np.int64)
    if length == 0:
        return out
    logits, state, _ = model.forward(prime_ids.reshape(-1, 1), None, train=False)   # P, 1, V
    last = _host(model, logits)[-1, 0]
    for t in range(length):
        out[t] = _next_token(last, temperature, top_k, rng, banned)
        logits, state, _ = model.forward(out[t:t + 1].reshape(1, 1), state, train=False)   # 1, 1, V
        last = _host(model, logits)[0, 0]
    return out


def sample(model, vocab, length, temperature=1.0, top_k=None, prime="", seed=None):
    """The priming text followed by ``length`` generated tokens, as text (str).

    Same arguments as :func:`sample_ids`. Char level: ``prime + continuation``; word level: words
    joined by spaces, ``<eos>`` shown as a line break.
    """
    ids = sample_ids(model, vocab, length, temperature, top_k, prime, seed)
    text = vocab.decode(ids)
    if vocab.level == "word" and prime and not prime[-1].isspace() and not text.startswith("\n"):
        return prime + " " + text
    return prime + text
