"""``python -m softvq_kernels.bench``: the benchmark of record (bench_op.main; console script softvq-bench)."""

from softvq_kernels.bench.bench_op import main

if __name__ == "__main__":
    main()
