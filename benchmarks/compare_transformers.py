"""Speed of gpt.GPT beside transformers' GPT2LMHeadModel at the same configuration.

Rows: training tokens/s (forward, backward and an AdamW step on random tokens), generation
tokens/s (batched sampling from a one-token prompt, KV cache on, temperature 1, no filtering),
and the speed-up of our KV cache over recomputing the whole context each step at 256 new
tokens. Both networks have random weights, no dropout, the same shape and the same parameter
count (checked). Each number is the best of --repeats runs, since the machine may be shared.

    OMP_NUM_THREADS=1 python benchmarks/compare_transformers.py                # prints a markdown table
    OMP_NUM_THREADS=1 python benchmarks/compare_transformers.py --n-layer 6 --n-embd 384 --n-head 6

transformers is needed for this benchmark only (pip install transformers); it is not a
dependency of gpt.py.
"""
import argparse
import datetime
import os
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import gpt  # noqa: E402


def _hf_model(c: gpt.GPTConfig):
    from transformers import GPT2Config, GPT2LMHeadModel
    hc = GPT2Config(vocab_size=c.vocab_size, n_positions=c.block_size, n_embd=c.n_embd, n_layer=c.n_layer,
                    n_head=c.n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                    activation_function="gelu_new", bos_token_id=0, eos_token_id=None, pad_token_id=None)
    model = GPT2LMHeadModel(hc, attn_implementation="sdpa") if _accepts_attn(GPT2LMHeadModel) else GPT2LMHeadModel(hc)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def _accepts_attn(cls):
    try:
        import inspect
        return "attn_implementation" in inspect.signature(cls.__init__).parameters
    except (TypeError, ValueError):
        return False


def _best(fn, repeats):
    fn()  # warm-up: allocations, kernel selection
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def _train_step_fn(model, idx, hf):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model.train()

    def step():
        logits = model(input_ids=idx[:, :-1], use_cache=False).logits if hf else model(idx[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), idx[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def rows(n_layer=4, n_head=4, n_embd=128, block_size=512, vocab_size=65, batch_size=8, seq_len=256,
         gen_batch=8, new_tokens=256, repeats=3, threads=None):
    """Measurements as a list of dicts {metric, ours, transformers, unit}."""
    if threads:
        torch.set_num_threads(threads)
    c = gpt.GPTConfig(n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=block_size,
                      vocab_size=vocab_size, dropout=0.0, bias=True)
    torch.manual_seed(0)
    ours = gpt.GPT(c)
    hf = _hf_model(c)
    n_ours = sum(p.numel() for p in ours.parameters())
    n_hf = sum(p.numel() for p in hf.parameters())
    if n_ours != n_hf:
        raise RuntimeError(f"parameter counts differ: ours {n_ours}, transformers {n_hf}")
    out = [dict(metric="parameters", ours=n_ours, transformers=n_hf, unit="")]

    idx = torch.randint(0, vocab_size, (batch_size, seq_len + 1), generator=torch.Generator().manual_seed(0))
    t_ours = _best(_train_step_fn(ours, idx, False), repeats)
    t_hf = _best(_train_step_fn(hf, idx, True), repeats)
    tokens = batch_size * seq_len
    out.append(dict(metric=f"training, batch {batch_size} x {seq_len} tokens", ours=tokens / t_ours,
                    transformers=tokens / t_hf, unit="tokens/s"))

    prompt = torch.ones(gen_batch, 1, dtype=torch.long)  # not the pad token (0), so transformers sees no padding
    ours.eval()
    hf.eval()

    def gen_ours(use_cache=True):
        return ours.generate(prompt, new_tokens, temperature=1.0, use_cache=use_cache,
                             generator=torch.Generator().manual_seed(0))

    def gen_hf():
        with torch.no_grad():
            y = hf.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                            min_new_tokens=new_tokens, do_sample=True, top_k=0, top_p=1.0, temperature=1.0,
                            use_cache=True)
        assert y.shape[1] == 1 + new_tokens
        return y

    g_ours = _best(gen_ours, repeats)
    g_hf = _best(gen_hf, repeats)
    new = gen_batch * new_tokens
    out.append(dict(metric=f"generation with KV cache, batch {gen_batch}, {new_tokens} new tokens",
                    ours=new / g_ours, transformers=new / g_hf, unit="tokens/s"))
    g_full = _best(lambda: gen_ours(use_cache=False), max(1, repeats - 2))
    out.append(dict(metric=f"generation recomputing the context, {new_tokens} new tokens", ours=new / g_full,
                    transformers=None, unit="tokens/s"))
    out.append(dict(metric="KV-cache speed-up (cached / recomputed)", ours=g_full / g_ours, transformers=None,
                    unit="x"))
    return out


def _fmt(v):
    if v is None:
        return "-"
    if isinstance(v, int):
        return f"{v:,}"
    return f"{v:,.0f}" if v >= 100 else f"{v:.2f}"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--n-embd", type=int, default=128)
    p.add_argument("--block-size", type=int, default=512)
    p.add_argument("--vocab-size", type=int, default=65)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--gen-batch", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args(argv)
    import transformers
    table = rows(a.n_layer, a.n_head, a.n_embd, a.block_size, a.vocab_size, a.batch_size, a.seq_len,
                 a.gen_batch, a.new_tokens, a.repeats)
    print(f"GPT speed, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; "
          f"{platform.machine()} {platform.processor() or ''} {os.cpu_count()} CPUs, torch {torch.__version__} "
          f"with {torch.get_num_threads()} threads, transformers {transformers.__version__}")
    print(f"command: OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '')} python benchmarks/compare_transformers.py "
          + " ".join(argv if argv is not None else sys.argv[1:]))
    print(f"config: {a.n_layer} layers, {a.n_head} heads, width {a.n_embd}, vocabulary {a.vocab_size}, "
          f"context {a.block_size}; best of {a.repeats}\n")
    print("| measurement | gpt.py | transformers GPT2LMHeadModel | unit |")
    print("| --- | ---: | ---: | --- |")
    for r in table:
        print(f"| {r['metric']} | {_fmt(r['ours'])} | {_fmt(r['transformers'])} | {r['unit']} |")


if __name__ == "__main__":
    main()
