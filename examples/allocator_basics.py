"""The allocator's Python API in a few lines: batched alloc, resolve, device-side growth, free.

Runs on a GPU if present, else on the CPU through Triton's interpreter:
    python examples/allocator_basics.py
"""
import torch

from avmp_triton import AVMPAllocator, InvalidHandleError, PoolExhaustedError, get_preset

spec = get_preset("nemotron-h-8b")
alloc = AVMPAllocator(spec, capacity_bytes=16 * 49 * 2**20, kv_fraction=0.5)
dev = alloc.device
print(alloc)

pages = alloc.alloc_kv(100)                 # one launch: [100] int32 handles
blocks = alloc.alloc_ssm(3)                 # exact 49.4 MiB blocks, same handle space
print("first page offsets:", alloc.resolve(pages[:4]).tolist())

# decode step: every request needs one more page, appended to its block-table row on the device
block_table = torch.full((4, 32), -1, dtype=torch.int32, device=dev)
num_pages = torch.zeros(4, dtype=torch.int32, device=dev)
failed = alloc.grow_kv(block_table, num_pages, torch.ones(4, dtype=torch.int32, device=dev))
print("granted rows:", (failed == 0).tolist(), "block table col 0:", block_table[:, 0].tolist())

try:
    alloc.free(torch.cat([pages[:2], pages[:1]]))   # a duplicate: nothing is freed
except InvalidHandleError as e:
    print("refused:", e)

try:
    alloc.alloc_ssm(1000)
except PoolExhaustedError as e:
    print("refused:", e)

alloc.free(torch.cat([pages, blocks]))
alloc.check_status(alloc.release_rows(torch.arange(4, dtype=torch.int32, device=dev), block_table, num_pages))
print(alloc.stats())
