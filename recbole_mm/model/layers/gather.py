"""Row gathers whose backward repeats itself bit for bit on a CPU with several threads."""

import torch


def gather_rows(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``table[index]`` (rows of ``table``, ``index`` of any shape); on a CPU through ``index_select``.

    Where ``index`` repeats a row (a user with several pairs in a BPR batch, an item at several
    positions of a sequence batch), the backward of ``table[index]`` (``index_put_`` with
    ``accumulate``) adds the repeated rows' gradients in parallel on torch's CPU, in the order the
    threads reach them: with two threads the same batch gives gradients that differ in their last
    bits from call to call, and a training run does not repeat. ``index_select``'s backward
    (``index_add_``) adds them in index order on a CPU, which on one thread is the order the other
    form uses too, so one-thread results are unchanged; it is also no slower there. On CUDA it is
    the other way round (``index_add_`` adds with atomics, ``index_put_`` sorts the indices
    first: torch.use_deterministic_algorithms' list), so there the indexing stays."""
    if table.device.type != "cpu":
        return table[index]
    return table.index_select(0, index.reshape(-1)).view(*index.shape, *table.shape[1:])
