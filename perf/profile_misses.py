"""Profile the two kernels that miss their bandwidth targets (run under Nsight Compute on the GPU).

    ncu --target-processes all -k regex:"decode|mamba1" --launch-skip 3 --launch-count 2 \
        --section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy \
        --section LaunchStats --section WarpStateStats python3 perf/profile_misses.py

Cases: decode attention B=64 ctx=512 (Jamba attention, bf16, 1-layer pages) and the Jamba Mamba1
state update B=256 (bf16 state); each kernel runs 5 times after setup.
"""
import torch

from avmp_triton.ops.paged_attention import paged_decode_attention
from perf import bench_paged_attention as BA
from perf import bench_mamba_state as BM


def main():
    cell = BA.build_cell(64, 512, BA.attn_spec(1, torch.bfloat16), "cuda")
    out = torch.empty_like(cell.q)
    for _ in range(5):
        paged_decode_attention(cell.q, cell.block_table, cell.seq_lens, cell.cache, layer=0, out=out)
    torch.cuda.synchronize()
    del cell
    torch.cuda.empty_cache()
    mc = BM.build_cell("mamba1", 256, torch.bfloat16, None, "cuda")
    run = BM.ours_fn(mc, torch.empty_like(mc.inputs["x"]))
    for _ in range(5):
        run()
    torch.cuda.synchronize()
    print("profiled: decode attention B=64 ctx=512; mamba1 state update B=256 bf16")


if __name__ == "__main__":
    main()
