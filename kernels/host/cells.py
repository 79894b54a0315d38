"""The cells, defined once: every other module (backends, the user layer, tests, perf)
imports these tables.

CELLS                 the cell names, in the order tables and tests list them
GATES[cell]           G, gate blocks of H rows in w_ih [G*H, I] and w_hh [G*H, H]:
                      LSTM 4 (i, f, g, o), GRU 3 (r, z, n), Elman RNN 1
STATE_PARTS[cell]     names of the state's [B, H] parts: ("h", "c") for the LSTM, else ("h",)
SEPARATE_HIDDEN_GRAD  cells whose gradient of the hidden-side pre-activations
                      (h W_hh^T + b_hh) differs from the input side's: the GRU, whose n block
                      is r * (W_hn h + b_hn)
"""

CELLS = ("lstm", "gru", "rnn_tanh", "rnn_relu")
GATES = {"lstm": 4, "gru": 3, "rnn_tanh": 1, "rnn_relu": 1}
STATE_PARTS = {"lstm": ("h", "c"), "gru": ("h",), "rnn_tanh": ("h",), "rnn_relu": ("h",)}
SEPARATE_HIDDEN_GRAD = frozenset({"gru"})
