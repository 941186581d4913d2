"""Greedy generation with a Nemotron-H model whose every cache byte lives in one AVMP arena.

Loads a local checkpoint directory (``--checkpoint DIR``: config.json + safetensors, nothing is
fetched), or builds a tiny random Nemotron-H (preset ``nemotron-h-tiny`` of
avmp_triton.models.loading) when none is given, and serves a few requests of different prompt
lengths through the runner: packed steps in which a request either prefills its next prompt chunk
(at most ``--chunk`` tokens) or decodes one token, so long prompts are still prefilling while short
ones already decode. A request stops after its budget (request i: ``--max-tokens`` - 2i, at least 1)
or at an EOS token, and is released at once: its KV pages and SSM block go back to the arena.

Check at the end, per request: transformers' own forward of the same model over prompt + generated
tokens (no cache) must pick, at every generated position, the token the runner picked. By
induction that makes the runner's tokens transformers' greedy continuation. In bf16/fp16 a
disagreement is accepted only where transformers' top two candidates are closer than twice the
runner's logit error there (a near tie that rounding decides); in fp32 none is accepted.

Runs on a GPU if present, else on the CPU through Triton's interpreter (seconds, with the tiny model):
    python examples/model_generation.py [--checkpoint DIR] [--max-tokens N] [--prompt-lens 13,5,21]
"""
import argparse

import torch

from avmp_triton.models.loading import load_checkpoint, random_model, runner_for

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", metavar="DIR", help="local checkpoint directory (default: a tiny random model)")
    p.add_argument("--preset", default="nemotron-h-tiny", help="random model's config without --checkpoint: a "
                   "preset name or a config.json path (default: %(default)s)")
    p.add_argument("--max-tokens", type=int, default=8, help="new tokens of the first request (default: %(default)s)")
    p.add_argument("--prompt-lens", default="13,5,21", help="prompt lengths, one request each (default: %(default)s)")
    p.add_argument("--chunk", type=int, default=8,
                   help="most prompt tokens per request per step (default: %(default)s)")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], help="default: the checkpoint's own; fp32 if random")
    p.add_argument("--device", default=DEV, help="default: %(default)s")
    p.add_argument("--capacity-mib", type=int, default=1024 if DEV == "cuda" else 64, help="arena size "
                   "(default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ignore-eos", action="store_true", help="generate every request's full budget")
    args = p.parse_args(argv)
    args.prompt_lens = [int(x) for x in args.prompt_lens.split(",")]
    if args.max_tokens < 1 or args.chunk < 1 or min(args.prompt_lens) < 1:
        p.error("--max-tokens, --chunk and every prompt length must be >= 1")
    return args


def eos_ids(model) -> set:
    """The model's EOS token ids (generation config first, as model.generate reads them)."""
    gen = getattr(model, "generation_config", None)
    eos = getattr(gen, "eos_token_id", None)
    eos = getattr(model.config, "eos_token_id", None) if eos is None else eos
    return set() if eos is None else set(eos if isinstance(eos, (list, tuple)) else [eos])


def generate(runner, prompts: dict, budgets: dict, *, chunk: int, eos: set) -> tuple[dict, dict]:
    """Serve every request to its end in packed steps; returns per request its generated tokens and
    the runner's fp32 logits that chose each of them."""
    fed = {r: 0 for r in prompts}                       # prompt tokens already in the request's cache
    out = {r: [] for r in prompts}
    logits = {r: [] for r in prompts}
    live, step = list(prompts), 0
    while live:
        # a request still in its prompt sends its next chunk; one past it, its last token
        kinds = ["prefill" if fed[r] < len(prompts[r]) else "decode" for r in live]
        toks = [prompts[r][fed[r]:fed[r] + chunk] if k == "prefill" else
                torch.tensor([out[r][-1]], device=runner.device) for r, k in zip(live, kinds)]
        step_logits = runner.step(live, toks)
        done = []
        for r, t, lg in zip(live, toks, step_logits):
            fed[r] = min(fed[r] + t.numel(), len(prompts[r]))
            if fed[r] < len(prompts[r]):
                continue                                # mid-prompt: nothing to sample yet
            out[r].append(int(lg.argmax()))
            logits[r].append(lg)
            if len(out[r]) == budgets[r] or out[r][-1] in eos:
                done.append(r)
        step += 1
        print(f"step {step:2d}: " + ", ".join(f"{r} {k} {t.numel()}" for r, k, t in zip(live, kinds, toks))
              + (f"; finished {done}, released" if done else ""))
        if done:
            runner.release(done)                        # pages and SSM block back to the arena now
            live = [r for r in live if r not in done]
    return out, logits


@torch.no_grad()
def check_against_transformers(model, prompts: dict, out: dict, logits: dict, dtype: torch.dtype) -> int:
    """Raise unless every generated token is transformers' argmax at its position (near ties aside
    in bf16/fp16, see the module docstring). Prints transformers' tokens and the logit error;
    returns the number of near ties."""
    all_ties = 0
    for r, prompt in prompts.items():
        seq = torch.cat([prompt, torch.tensor(out[r], device=prompt.device)])
        ref = model(seq[None], use_cache=False).logits[0, len(prompt) - 1:len(seq) - 1].float()
        got = torch.stack(logits[r]).to(ref.device)
        err = (got - ref).abs().max(dim=-1).values          # runner's logit error per generated token
        want = ref.argmax(-1).tolist()
        bad = []
        for j, (g, w) in enumerate(zip(out[r], want)):
            gap = float(ref[j, w] - ref[j, g])               # how far transformers prefers its own pick
            if g != w and (dtype == torch.float32 or gap > 2 * float(err[j])):
                bad.append((j, g, w, gap))
        ties = sum(g != w for g, w in zip(out[r], want)) - len(bad)
        all_ties += ties
        print(f"{r}: transformers {want}  max logit error {float(err.max()):.2e}"
              + (f"  ({ties} near tie(s) decided by rounding)" if ties else ""))
        if bad:
            raise AssertionError(f"request {r}: runner and transformers disagree (position, runner, transformers, "
                                 f"logit gap): {bad}")
        if dtype == torch.float32 and float(err.max()) > 1e-3:
            raise AssertionError(f"request {r}: fp32 logit error {float(err.max()):.2e} > 1e-3")
    return all_ties


def build_model(args) -> torch.nn.Module:
    if args.checkpoint:
        return load_checkpoint(args.checkpoint, dtype=args.dtype, device=args.device)
    return random_model(args.preset, dtype=args.dtype or "fp32", device=args.device, seed=args.seed)


def main(argv=None) -> dict:
    args = parse_args(argv)
    model = build_model(args)
    dtype = model.dtype
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(args.seed)
    prompts = {f"r{i}": torch.randint(0, vocab, (n,), generator=gen).to(args.device)
               for i, n in enumerate(args.prompt_lens)}
    budgets = {r: max(1, args.max_tokens - 2 * i) for i, r in enumerate(prompts)}
    runner = runner_for(model, capacity_bytes=args.capacity_mib << 20, max_requests=len(prompts),
                        max_context=max(args.prompt_lens) + args.max_tokens)
    print(f"{type(model).__name__} (layers {runner.pattern}), {dtype}, {args.device}; prompts "
          f"{args.prompt_lens}, budgets {list(budgets.values())}, chunk {args.chunk}")
    eos = set() if args.ignore_eos else eos_ids(model)
    out, logits = generate(runner, prompts, budgets, chunk=args.chunk, eos=eos)
    for r in prompts:
        print(f"{r}: prompt {len(prompts[r])} tokens -> generated {out[r]}")
    st = runner.allocator.stats()
    assert (st.live_kv, st.live_ssm) == (0, 0), f"released requests left units in the arena: {st}"
    ties = check_against_transformers(model, prompts, out, logits, dtype)
    print(f"ok: runner greedy tokens == transformers' greedy continuation ({len(prompts)} requests, "
          f"{args.device}, {dtype}" + (f"; {ties} near tie(s) within the logit error" if ties else "") + ")")
    return out


if __name__ == "__main__":
    main()
