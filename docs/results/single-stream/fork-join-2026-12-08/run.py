"""One-off probe (2026-12-08): reading the weights of a batch-1 decode step's 120 matmuls (SmolLM2's q8_0 shapes,
113 MB) with 2 threads, each matmul's bytes split in halves, as one OpenMP region per matmul (at::parallel_for, as
the kernels do: "fork") or as one region for all of them with a spin barrier after each matmul ("team", layout 0:
matrix-contiguous, 1: each thread's halves contiguous; barrier 1/0), beside a 512 MiB torch sum.

    python docs/results/single-stream/fork-join-2026-12-08/run.py 10
"""
import os, tempfile, torch, time, statistics, sys
from torch.utils.cpp_extension import load
here = os.path.dirname(os.path.abspath(__file__))
build = os.path.join(tempfile.gettempdir(), "kvserve-fork-join-probe"); os.makedirs(build, exist_ok=True)
m = load("streamexp", [os.path.join(here, "stream.cpp")], extra_cflags=["-O3", "-march=native", "-fopenmp"], extra_ldflags=["-fopenmp"], build_directory=build, verbose=False)
torch.set_num_threads(2)
K = 576
layer = [960*K*17//16, K*K*17//16, 3072*K*17//16, K*1536*17//16]
layer = [s // 512 * 512 for s in layer]
sizes = layer * 30
total = sum(sizes)
buf = torch.ones(total // 4 + 1024, dtype=torch.int32)
big = torch.ones(512 << 18, dtype=torch.float32)
V = [("fork", 0), ("team", 0, 1), ("team", 1, 1), ("team", 0, 0), ("team", 1, 0)]
res = {v: [] for v in V}
for r in range(int(sys.argv[1])):
    t0 = time.perf_counter(); big.sum(); bw = (512 << 20) / (time.perf_counter() - t0) / 1e9
    line = [f"read {bw:5.1f}"]
    for v in V:
        ts = [(m.run(buf, sizes, 0, 8192, 0) if v[0] == "fork" else m.run_team(buf, sizes, v[1], 8192, v[2])) for _ in range(5)]
        g = total / statistics.median(ts) / 1e9
        res[v].append(g); line.append(f"{v} {g:5.1f}")
    print(" | ".join(line), flush=True)
for v in V: print(v, f"median {statistics.median(res[v]):.1f} GB/s")
