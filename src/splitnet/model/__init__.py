"""The network: the layout table, the column built from it, and the exchanges between columns.

    layout.py       the table (one row per paper layer) and its costs; the built-in layouts
    rows.py         a row, its costs, LayoutError; analysis.py: checking a table and costing it
    config.py       ModelConfig (the paper's values as defaults)
    layers.py       LRN (§3.3) and the paper's dropout (§4.2)
    columns.py      SplitAlexNet: one Column per column of the table
    exchange.py     LocalExchange and record_exchanges (§3.2)
    concurrent.py   running the columns at the same time (threads, CUDA streams); tune.py times them
    placement.py    devices per column; precision.py: fp32 / tf32 / bf16 / fp16
    convert.py      the grouped single-device state dict; grouped.py: the grouped network itself
    cli.py          `splitnet layouts`

Imports only splitnet.config and splitnet.data (data.rng, for the dropout seeds); nothing here knows
about training.
"""
