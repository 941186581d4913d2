"""A hybrid (attention + Mamba2) layer pair served from one AVMP arena: chunked prefill, then decode.

Every cache access goes through the handle table: K/V pages grown on the device (``grow_kv``),
written by ``kv_append`` and read by the paged attention kernels; each request's conv and SSM
state live in its SSM block and are read and written in place by the prefill and decode Mamba
ops. Midway, capacity is moved between the pools (live SSM blocks are compacted to new offsets);
the handles stay valid and generation goes on.

Check at the end: the outputs of the tokens produced step by step (prefill in two chunks, then
one decode step per token) equal the outputs of one prefill over the whole sequence on a fresh
arena. Projections are left out (random per-token inputs stand in for them), so the check is about
the cache: pages, conv state and SSM state carried correctly across chunks, steps and migration.

Runs on a GPU if present, else on the CPU through Triton's interpreter (about a minute):
    python examples/hybrid_generation.py
"""
import torch

from avmp_triton import AVMPAllocator, HybridModelSpec, PagedCache
from avmp_triton.ops import (
    causal_conv1d_prefill,
    causal_conv1d_update,
    kv_append,
    mamba2_scan_prefill,
    mamba2_state_update,
    paged_decode_attention,
    paged_prefill_attention,
)

DEV = "cuda" if torch.cuda.is_available() else "cpu"
DT = torch.bfloat16 if DEV == "cuda" else torch.float32
SPEC = HybridModelSpec(
    name="tiny-hybrid", num_attn_layers=1, num_kv_heads=2, head_dim=64, kv_dtype=DT,
    num_mamba_layers=1, mamba_version=2, d_inner=64, mamba_num_heads=4, mamba_head_dim=16,
    d_state=16, n_groups=2, d_conv=4, conv_dtype=DT, ssm_dtype=DT)
HQ = 4                                   # query heads (GQA 2)
PROMPTS = [37, 20]                       # prompt lengths of the two requests
CHUNK = 24                               # chunked prefill: at most this many tokens per request per chunk
NEW_TOKENS = 9                           # decode steps
MAX_PAGES = 8                            # block-table width


def draw_inputs(total: int, gen: torch.Generator) -> dict:
    """Per-token inputs of one request: what the projections would produce."""
    H = SPEC.mamba_num_heads
    r = lambda *s: torch.randn(*s, generator=gen).to(DEV, DT)  # noqa: E731
    return dict(q=r(total, HQ, SPEC.head_dim), k=r(total, SPEC.num_kv_heads, SPEC.head_dim),
                v=r(total, SPEC.num_kv_heads, SPEC.head_dim), xbc=r(total, SPEC.conv_channels),
                dt=r(total, H) * 0.5)


def weights(gen: torch.Generator) -> dict:
    H = SPEC.mamba_num_heads
    f = lambda *s: torch.randn(*s, generator=gen).to(DEV)  # noqa: E731
    return dict(conv_w=(f(SPEC.conv_channels, SPEC.d_conv) * 0.5).to(DT), conv_b=f(SPEC.conv_channels).to(DT),
                A=-torch.rand(H, generator=gen).to(DEV) - 0.2, D=f(H), dt_bias=f(H) * 0.5 - 1.0)


def split_xbc(xbc: torch.Tensor):
    """The conv output's x | B | C channels, as Mamba2 splits them."""
    H, P, G, N = SPEC.mamba_num_heads, SPEC.mamba_head_dim, SPEC.n_groups, SPEC.d_state
    x, B, C = torch.split(xbc, [H * P, G * N, G * N], dim=-1)
    return x.reshape(-1, H, P).contiguous(), B.reshape(-1, G, N).contiguous(), C.reshape(-1, G, N).contiguous()


class Engine:
    """Two requests' caches in one arena: a block table of KV pages and one SSM block each."""

    def __init__(self, w: dict):
        self.w = w
        # slabs of two SSM blocks; 2 SSM slabs, 6 KV slabs
        block = -(-SPEC.ssm_block_bytes // 16) * 16
        slab = -(-max(2 * block, SPEC.kv_page_bytes) // 128) * 128
        self.alloc = AVMPAllocator(SPEC, capacity_bytes=8 * slab, slab_bytes=slab, kv_fraction=6 / 8, device=DEV)
        self.cache = PagedCache.of(self.alloc)
        n = len(PROMPTS)
        # one SSM block per request, in different slabs (so moving a slab later needs compaction)
        four = self.alloc.alloc_ssm(4)
        slab_of = (self.alloc.resolve(four) // slab).tolist()
        keep = [slab_of.index(s) for s in sorted(set(slab_of))][:n]
        self.alloc.free(four[[i for i in range(4) if i not in keep]])
        self.ssm = four[keep].contiguous()
        self.block_table = torch.full((n, MAX_PAGES), -1, dtype=torch.int32, device=DEV)
        self.num_pages = torch.zeros(n, dtype=torch.int32, device=DEV)
        self.seen = [0] * n                      # tokens of each request already in the cache

    def _grow_to(self, lens: list) -> None:
        pages = -(-torch.tensor(lens, device=DEV) // self.alloc.page_tokens)
        failed = self.alloc.grow_kv(self.block_table, self.num_pages, (pages - self.num_pages).to(torch.int32))
        if bool((failed != 0).any()):              # a sync, only to make room on the host
            self.alloc.make_room("kv", int((pages - self.num_pages).clamp_min(0).sum()))
            self._grow_to(lens)

    def prefill(self, chunks: list) -> list:
        """One packed chunk: ``chunks[b]`` is request b's new tokens (dict of [t, ...] inputs)."""
        lens = [c["q"].shape[0] for c in chunks]
        self._grow_to([s + n for s, n in zip(self.seen, lens)])
        cat = {k: torch.cat([c[k] for c in chunks]) for k in chunks[0]}
        cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device=DEV)
        req = torch.cat([torch.full((n,), b, dtype=torch.int32) for b, n in enumerate(lens)]).to(DEV)
        pos = torch.cat([torch.arange(s, s + n, dtype=torch.int32) for s, n in zip(self.seen, lens)]).to(DEV)
        seq_lens = torch.tensor([s + n for s, n in zip(self.seen, lens)], dtype=torch.int32, device=DEV)
        init = torch.tensor([int(s > 0) for s in self.seen], dtype=torch.int32, device=DEV)

        kv_append(cat["k"], cat["v"], self.block_table, req, pos, self.cache, layer=0)
        attn = paged_prefill_attention(cat["q"], self.block_table, seq_lens, cu, self.cache, layer=0)
        xbc = causal_conv1d_prefill(cat["xbc"], self.w["conv_w"], self.ssm, cu, init, self.cache, layer=0,
                                    bias=self.w["conv_b"], activation="silu")
        x, B, C = split_xbc(xbc)
        y = mamba2_scan_prefill(x, cat["dt"], self.w["A"], B, C, self.ssm, cu, init, self.cache, layer=0,
                                D=self.w["D"], dt_bias=self.w["dt_bias"], dt_softplus=True)
        self.seen = [s + n for s, n in zip(self.seen, lens)]
        outs = torch.cat([attn.flatten(1), y.flatten(1)], dim=1)
        return list(torch.split(outs, lens))

    def decode(self, tok: list) -> list:
        """One token per request (``tok[b]``: dict of [1, ...] inputs)."""
        self._grow_to([s + 1 for s in self.seen])
        cat = {k: torch.cat([t[k] for t in tok]) for k in tok[0]}
        n = len(tok)
        req = torch.arange(n, dtype=torch.int32, device=DEV)
        pos = torch.tensor(self.seen, dtype=torch.int32, device=DEV)
        kv_append(cat["k"], cat["v"], self.block_table, req, pos, self.cache, layer=0)
        attn = paged_decode_attention(cat["q"], self.block_table, pos + 1, self.cache, layer=0)
        xbc = causal_conv1d_update(cat["xbc"], self.w["conv_w"], self.ssm, self.cache, layer=0, bias=self.w["conv_b"],
                                   activation="silu")
        x, B, C = split_xbc(xbc)
        y = mamba2_state_update(x, cat["dt"], self.w["A"], B, C, self.ssm, self.cache, layer=0, D=self.w["D"],
                                dt_bias=self.w["dt_bias"], dt_softplus=True)
        self.seen = [s + 1 for s in self.seen]
        return list(torch.cat([attn.flatten(1), y.flatten(1)], dim=1).split(1))


def main() -> None:
    gen = torch.Generator().manual_seed(0)
    w = weights(gen)
    seqs = [draw_inputs(p + NEW_TOKENS, gen) for p in PROMPTS]

    eng = Engine(w)
    outs = [[] for _ in PROMPTS]
    # chunked prefill: every request advances by up to CHUNK tokens per packed chunk
    while any(s < p for s, p in zip(eng.seen, PROMPTS)):
        chunks = [{k: v[s:min(p, s + CHUNK)] for k, v in seq.items()}
                  for seq, s, p in zip(seqs, eng.seen, PROMPTS)]
        for b, o in enumerate(eng.prefill(chunks)):
            outs[b].append(o)
        print(f"prefill chunk: {[c['q'].shape[0] for c in chunks]} tokens, in cache {eng.seen}")
    for step in range(NEW_TOKENS):
        if step == NEW_TOKENS // 2:
            before = eng.alloc.resolve(eng.ssm).tolist()
            eng.alloc.rebalance("kv", 1)          # no free SSM slab: compacts the SSM pool
            st = eng.alloc.stats()
            print(f"rebalance: SSM blocks {before} -> {eng.alloc.resolve(eng.ssm).tolist()} "
                  f"(migrations {st.migrations}, units moved {st.units_moved}); same handles {eng.ssm.tolist()}")
        tok = [{k: v[s:s + 1] for k, v in seq.items()} for seq, s in zip(seqs, eng.seen)]
        for b, o in enumerate(eng.decode(tok)):
            outs[b].append(o)
    print(f"decoded {NEW_TOKENS} tokens per request; pages per request {eng.num_pages.tolist()}")

    # the same sequences in one prefill on a fresh arena
    ref = Engine(w)
    want = ref.prefill([{k: v for k, v in seq.items()} for seq in seqs])
    tol = dict(atol=5e-2, rtol=5e-2) if DT == torch.bfloat16 else dict(atol=1e-4, rtol=1e-4)
    for b in range(len(PROMPTS)):
        got = torch.cat(outs[b])
        torch.testing.assert_close(got.float(), want[b].float(), **tol)
    print(f"ok: step-by-step outputs == one-shot prefill ({DEV}, {DT})")


if __name__ == "__main__":
    main()
