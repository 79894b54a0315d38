"""The GEMMs after a backward time loop, written once over the array module ``xp``.

The time loop leaves the gradients of every step's pre-activations; the parameter gradients
and dx are then large GEMMs over many rows at once (Haste's shape), in the time blocks of
:mod:`.blocks`. A backend may run its own version (the cpu backend's threaded one), with the
same contract.
"""

from .blocks import time_blocks


def states_entering(h0, y, t0, t1, xp):
    """h_prev[t0:t1], the states entering steps t0 .. t1-1 (h0 then h_1 .. h_{T-1}), as
    [t1-t0, B, H]: a view of y where t0 > 0, a fresh array where the window holds h0."""
    if t0 > 0:
        return y[t0 - 1:t1 - 1]                                     # T',B,H
    return xp.concatenate([h0[None], y[:t1 - 1]], axis=0)           # T',B,H


def finish_backward(x, h0, y, dg_x, dg_h, t_start, w_ih, dw_ih, dw_hh, db_ih, db_hh, xp,
                    t_origin=0, blocked=True):
    """Accumulate (+=) the parameter gradients over steps t_start .. T-1 and return dx.

    x     [T,B,I]    the layer input (or x W_ih^T [T,B,G*H] where w_ih is None)
    h0    [B,H]      initial hidden state      y  [T,B,H]  h_1 .. h_T
    dg_x  [T,B,G*H]  dL/d(x W_ih^T + b_ih) of every step (rows t >= t_start are read)
    dg_h  [T,B,G*H]  dL/d(h W_hh^T + b_hh) (the same array as dg_x except for the GRU)
    dw_ih [G*H,I] += dg_x^T x     dw_hh [G*H,H] += dg_h^T h_prev
    db_ih [G*H]   += sum dg_x     db_hh [G*H]   += sum dg_h
    t_origin         the stream's step of step 0: the sums run in its time blocks
                     (``blocks.time_blocks``; ``blocked`` False: one), the last block first
    Returns dx [T,B,I] = dg_x W_ih (rows t < t_start zero); with w_ih None (the caller
    projected the input, dw_ih None too) dg_x itself, its rows t < t_start zeroed: that is
    dL/d(x W_ih^T).
    """
    T, B, GH = dg_x.shape
    H = y.shape[2]
    dx = dg_x if w_ih is None else xp.zeros((T, B, x.shape[2]), dtype=dg_x.dtype)   # T,B,I
    bounds = time_blocks(t_start, T, t_origin, B, blocked)
    for t1, t0 in zip(bounds[:-1].tolist(), bounds[1:].tolist()):  # blocks, last first
        n = (t1 - t0) * B                                           # rows of the block
        gx2 = dg_x[t0:t1].reshape(n, GH)                            # n,G*H
        gh2 = dg_h[t0:t1].reshape(n, GH)                            # n,G*H
        db_ih += gx2.sum(axis=0)                                    # G*H
        db_hh += gh2.sum(axis=0)                                    # G*H
        h_prev = states_entering(h0, y, t0, t1, xp).reshape(n, H)   # n,H
        dw_hh += xp.matmul(gh2.T, h_prev)                           # G*H,H
        if w_ih is not None:
            I = x.shape[2]
            dw_ih += xp.matmul(gx2.T, x[t0:t1].reshape(n, I))       # G*H,I
            dx[t0:t1] = xp.matmul(gx2, w_ih).reshape(t1 - t0, B, I)  # dx = dg_x W_ih
    dx[:t_start] = 0                                                # dL/d(x W_ih^T) too
    return dx
