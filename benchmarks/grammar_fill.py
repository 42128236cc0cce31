"""Host-side cost of structured-output masks: filling a step's bitmasks for N requests
inside a JSON string (the costliest common state), one by one vs XGrammar's batch
matcher with several thread counts, vs a Python thread pool filling rows one by one
(XGrammar releases the GIL while filling). CPU only.

    python benchmarks/grammar_fill.py --tokenizer .bench-tokenizer
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from structured_output import SCHEMA  # noqa: E402

PREFIXES = ['{"records": [{"id": 12, "name": "Ann', '{"records": [{"id": 1, "name": "x", '
            '"email": "a@b', '{"records": [{"id": 7, "name": "Bo', '{"records": [']


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--vocab-size", type=int, default=151936)
    parser.add_argument("--rows", type=int, nargs="+", default=[8, 32, 64])
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()

    import xgrammar
    from transformers import AutoTokenizer

    from kvloom.plugins.structured_output.xgrammar_backend import XGrammarBackend

    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    backend = XGrammarBackend(tokenizer, args.vocab_size)
    grammars = []
    for index in range(max(args.rows)):
        grammar = backend.compile("json", SCHEMA)
        assert grammar.accept_tokens(tokenizer.encode(PREFIXES[index % len(PREFIXES)]))
        grammars.append(grammar)
    bitmask = backend.allocate_bitmask(max(args.rows))
    cpus = len(os.sched_getaffinity(0))
    thread_counts = sorted({1, 2, 4, 8, cpus // 2, cpus} - {0})
    print(f"cpus {cpus}, vocab {args.vocab_size}; ms per fill of all rows")
    print(f"{'rows':>6}{'loop':>9}" + "".join(f"{f'batch{t}':>10}" for t in thread_counts)
          + f"{'auto':>10}" + "".join(f"{f'pool{t}':>10}" for t in (4, 8, max(1, cpus - 2))))
    for num_rows in args.rows:
        matchers = [g.matcher for g in grammars[:num_rows]]
        rows = list(range(num_rows))

        def timed(fill) -> float:
            fill()
            started = time.perf_counter()
            for _ in range(args.repeats):
                fill()
            return (time.perf_counter() - started) / args.repeats * 1e3

        loop = timed(lambda: [m.fill_next_token_bitmask(bitmask, i) for i, m in enumerate(matchers)])
        cells = []
        for threads in thread_counts + ["auto"]:
            batch = xgrammar.BatchGrammarMatcher(max_threads=threads)
            cells.append(timed(lambda: batch.batch_fill_next_token_bitmask(matchers, bitmask, rows)))
        for threads in (4, 8, max(1, cpus - 2)):
            pool = ThreadPoolExecutor(threads)
            chunks = [rows[i::threads] for i in range(threads)]

            def fill_chunk(chunk):
                for row in chunk:
                    matchers[row].fill_next_token_bitmask(bitmask, row)

            cells.append(timed(lambda: list(pool.map(fill_chunk, chunks))))
            pool.shutdown()
        print(f"{num_rows:>6}{loop:>9.2f}" + "".join(f"{c:>10.2f}" for c in cells))


if __name__ == "__main__":
    main()
