"""The parity checks every model family's runner passes against transformers' own forward (the
family's test module supplies its tiny random model, its runner factory and its vocabulary):
single and packed prefills, chunked prefill then decode, and a compaction of live KV pages and SSM
blocks in the middle of generation. Max abs logit error, fp32, below ``TOL``."""
import torch

TOL = 1e-4
DEV = "cuda" if torch.cuda.is_available() else "cpu"   # the ops run where the arena is


def randomize(model: torch.nn.Module, gen: torch.Generator) -> None:
    """Every parameter random (A_log, dt_bias, D, norms and biases too, which transformers' init
    leaves constant), at a scale that keeps activations O(1)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if name.endswith("A_log"):
                p.copy_(noise * 0.5)                    # A = -exp(A_log) in about [-2.7, -0.4]
            elif name.endswith("dt_bias"):
                p.copy_(noise * 0.5 - 1.0)
            elif "norm" in name:
                p.copy_(1.0 + 0.2 * noise)
            elif p.dim() == 1:                          # D, conv bias, the projections' biases
                p.copy_(noise * 0.5)
            elif "embed" in name:                       # embed_tokens, embeddings
                p.copy_(noise)
            else:                                       # linears, the conv, experts' [E, out, in]: fan-in
                p.copy_(noise * p.shape[-1] ** -0.5)


def routed_experts(router, x: torch.Tensor) -> torch.Tensor:
    """The expert indices a transformers MoE router picks for ``x``: its one integer output (5.x
    releases return them in different positions of tuples of different lengths)."""
    with torch.no_grad():
        out = router(x)
    ints = [t for t in out if isinstance(t, torch.Tensor) and not t.dtype.is_floating_point]
    assert len(ints) == 1, f"router returned {[getattr(t, 'dtype', type(t)) for t in out]}"
    return ints[0]


def reference(hf_model, ids: torch.Tensor) -> torch.Tensor:
    """transformers' logits ``[len, vocab]`` of a whole sequence, without a cache."""
    with torch.no_grad():
        return hf_model(ids[None], use_cache=False).logits[0].float()


def max_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return (got - want).abs().max().item()


def tokens(n: int, seed: int, vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).to(DEV)


def check_prefill_one_request(hf_model, make_runner, vocab: int) -> None:
    ids = tokens(21, 1, vocab)
    runner = make_runner(hf_model)
    logits = runner.step(["a"], [ids], all_logits=True)[0]
    err = max_err(logits, reference(hf_model, ids))
    print(f"prefill, one request: max abs logit error {err:.2e}")
    assert err < TOL
    last = runner.step(["b"], [ids])[0]       # the default: the last token's logits only
    assert last.shape == (vocab,) and max_err(last, logits[-1]) < TOL


def check_two_requests_packed(hf_model, make_runner, vocab: int) -> None:
    seqs = [tokens(19, 2, vocab), tokens(7, 3, vocab)]
    runner = make_runner(hf_model)
    got = runner.step(["x", "y"], seqs, all_logits=True)
    errs = [max_err(g, reference(hf_model, s)) for g, s in zip(got, seqs)]
    print(f"packed prefill of 19 + 7 tokens: max abs logit errors {errs[0]:.2e}, {errs[1]:.2e}")
    assert max(errs) < TOL


def check_chunked_prefill_then_decode(hf_model, make_runner, vocab: int) -> None:
    ids = tokens(26, 4, vocab)                       # 13 + 9 prompt tokens in two chunks, then 4 decoded
    want = reference(hf_model, ids)
    runner = make_runner(hf_model)
    got = [runner.step([0], [ids[:13]], all_logits=True)[0],
           runner.step([0], [ids[13:22]], positions=[13], all_logits=True)[0]]
    for i in range(22, 26):
        got.append(runner.step([0], [ids[i:i + 1]], positions=[i])[0][None])
    err = max_err(torch.cat(got), want)
    print(f"chunked prefill (13 + 9) then 4 decode steps: max abs logit error {err:.2e}")
    assert err < TOL
    assert runner.num_pages[runner.rows[0]].item() == 2   # 26 tokens: two pages of 16


def _offsets(runner, rid) -> list:
    row = runner.rows[rid]
    pages = runner.block_table[row, :runner.num_pages[row]]
    return runner.allocator.resolve(torch.cat([pages, runner.ssm_handles[row:row + 1]])).tolist()


def check_compaction_mid_generation_changes_nothing(hf_model, make_runner, vocab: int) -> None:
    seqs = {"a": tokens(24, 5, vocab), "b": tokens(20, 6, vocab), "c": tokens(27, 7, vocab)}
    want = {r: reference(hf_model, s) for r, s in seqs.items()}
    runner = make_runner(hf_model)
    alloc = runner.allocator
    # a and b share the first SSM slab and KV slab, c takes the next ones; b leaves, so neither
    # pool has a free slab beyond two spare ones and moving 3 slabs must compact live units
    got = {r: [g] for r, g in zip("abc", runner.step(list("abc"), [seqs["a"][:20], seqs["b"], seqs["c"][:20]],
                                                      all_logits=True))}
    runner.release(["b"])
    before = {r: _offsets(runner, r) for r in "ac"}
    alloc.rebalance("kv", 3)                   # compacts an SSM slab with a live block
    moved_ssm = alloc.stats().bytes_copied
    alloc.rebalance("ssm", 6)                  # then a KV slab with live (rotated) K pages
    stats = alloc.stats()
    after = {r: _offsets(runner, r) for r in "ac"}
    print(f"compaction: {stats.units_moved} units moved, {stats.bytes_copied} bytes copied; "
          f"offsets {before} -> {after}")
    assert moved_ssm > 0 and stats.bytes_copied > moved_ssm and before != after
    # one mixed step (a decodes, c prefills a continuation chunk), then decode both
    for r, g in zip("ac", runner.step(["a", "c"], [seqs["a"][20:21], seqs["c"][20:24]], all_logits=True)):
        got[r].append(g)
    for i in range(21, 24):
        for r, g in zip("ac", runner.step(["a", "c"], [seqs["a"][i:i + 1], seqs["c"][i + 3:i + 4]])):
            got[r].append(g[None])
    errs = {r: max_err(torch.cat(got[r]), want[r]) for r in "ac"}
    print(f"compaction mid-generation: max abs logit errors {errs}")
    assert max(errs.values()) < TOL
    assert len(got["b"]) == 1 and max_err(got["b"][0], want["b"]) < TOL


def check_fixed_shape_decode(hf_model, make_runner, vocab: int) -> None:
    """``runner.decode`` (the step CUDA graphs capture) over rows in a scattered order with a
    padding row between them: each request's logits equal transformers' on its whole sequence,
    the bytes the eager step leaves unchanged stay unchanged (the padding row wrote nothing), and
    the ones it writes (new K/V, conv and SSM states) get the same values (fp32, up to the
    matmuls' rounding at another batch size)."""
    seqs = [tokens(18, 8, vocab), tokens(5, 9, vocab), tokens(11, 10, vocab)]
    runner = make_runner(hf_model)
    runner.step(list("abc"), [s[:-1] for s in seqs])
    order = ["c", "a", None, "b"]                  # row 2 is padding
    real = [b for b, r in enumerate(order) if r is not None]
    rows = torch.tensor([runner.rows[r] for r in order if r is not None], device=runner.device)
    W = runner.block_table.shape[1]
    bt = torch.full((4, W), -1, dtype=torch.int32, device=runner.device)
    ssm = torch.full((4,), -1, dtype=torch.int32, device=runner.device)
    bt[real], ssm[real] = runner.block_table[rows], runner.ssm_handles[rows]
    bt[2] = runner.block_table[runner.rows["a"]]   # a stale row, as a graph's padding rows keep
    seq = {"a": seqs[0], "b": seqs[1], "c": seqs[2]}
    toks = torch.tensor([int(seq[r][-1]) if r else 0 for r in order], device=runner.device)
    lens = torch.tensor([len(seq[r]) if r else 0 for r in order], dtype=torch.int32, device=runner.device)
    before = runner.allocator.arena.clone()
    eager = runner.forward([seq[r][-1:] for r in order if r], bt[real], ssm[real], [len(seq[r]) - 1 for r in order if r])
    after_eager = runner.allocator.arena.clone()
    runner.allocator.arena.copy_(before)
    got = runner.decode(toks, bt, ssm, lens)
    errs = [max_err(got[b], reference(hf_model, seq[order[b]])[-1]) for b in real]
    print(f"fixed-shape decode, rows c a (pad) b: max abs logit errors {errs}; vs eager "
          f"{max_err(got[real], eager):.2e}")
    assert max(errs) < TOL
    words = [t.view(torch.int32) for t in (runner.allocator.arena, before, after_eager)]
    kept = words[1] == words[2]
    assert torch.equal(words[0][kept], words[1][kept]) and not kept.all()
    got_f, eager_f = (t.view(torch.float32)[~kept] for t in (runner.allocator.arena, after_eager))
    assert max_err(got_f, eager_f) < TOL
