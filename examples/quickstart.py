"""The README's Python example as a script: ``python examples/quickstart.py``.

Dask starts its workers as new processes that import this file again, so
the work goes under ``if __name__ == "__main__":``.
"""

import bitinglip


def main() -> None:
    texts = ["The cat sat on the mat.", "Batch inference on Dask.", "Hello, world!"]
    with bitinglip.connect() as platform:  # no address: an embedded local Dask cluster
        job = platform.submit("embed", model="all-MiniLM-L6-v2", inputs=texts)
        job.progress()  # a bar in a terminal and in Jupyter; returns the figures
        df = job.result()  # pandas, one row per input, input order kept
    print(f"{len(df)} rows, embeddings of {len(df['embedding'][0])} dimensions")


if __name__ == "__main__":
    main()
