"""Benchmarks and profilers of soft VQ (not needed to use the op).

    python -m softvq_kernels.bench [options]        # = softvq-bench: bench_op.main, the benchmark of record
    python -m softvq_kernels.bench.profile_backend  # per-kernel CUDA time of one backend through the API
    python -m softvq_kernels.bench.profile_triton   # Triton per-kernel breakdown and block-config sweep

How each committed figure in benchmarks/results/ was produced: docs/benchmarks.md.
"""
