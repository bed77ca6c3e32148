"""Measuring and comparing runs: the end-of-run evaluation, metrics of a run directory, grids of
methods x seeds (`tokentrust compare`), the statistics over seeds and the report (`tokentrust report`).
Everything here reads what `tokentrust.train` wrote; nothing touches a trainer's state."""
