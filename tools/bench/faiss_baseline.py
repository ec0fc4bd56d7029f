#!/usr/bin/env python3
"""faiss-cpu IndexFlatIP baseline for `facematch-bench`: exact float32 inner
product, searched one query at a time (as gates send them).

Usage: faiss_baseline.py DIR DIM
DIR holds gallery.f32 and queries.f32 (little-endian float32, row-major, unit
vectors). Prints one JSON line: queries per second and the top-1 row of every
query.
"""
import json
import os
import sys
import time

import faiss
import numpy as np


def main() -> None:
    d, dim = sys.argv[1], int(sys.argv[2])
    gallery = np.fromfile(os.path.join(d, "gallery.f32"), dtype="<f4").reshape(-1, dim)
    queries = np.fromfile(os.path.join(d, "queries.f32"), dtype="<f4").reshape(-1, dim)
    threads = int(os.environ.get("FAISS_THREADS", "1"))
    faiss.omp_set_num_threads(threads)
    index = faiss.IndexFlatIP(dim)
    index.add(gallery)
    # Warm-up, then one query at a time.
    for q in queries[:20]:
        index.search(q.reshape(1, dim), 1)
    top1 = []
    start = time.perf_counter()
    for q in queries:
        _, ids = index.search(q.reshape(1, dim), 1)
        top1.append(int(ids[0][0]))
    elapsed = time.perf_counter() - start
    print(json.dumps({
        "faiss_version": faiss.__version__,
        "threads": threads,
        "queries": len(queries),
        "qps": len(queries) / elapsed,
        "top1": top1,
    }))


if __name__ == "__main__":
    main()
