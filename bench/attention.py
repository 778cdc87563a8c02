"""Decode-attention benchmarks for the rollout engine's Triton kernels (one CUDA GPU).

Two questions, on the Qwen2-0.5B attention shape (14 query heads, 2 KV heads, head_dim 64, bf16,
16-token cache blocks), 256 live sequences:

1. Is the fused paged kernel memory-bound as it should be? Achieved bandwidth (bytes of K/V read /
   time) at 1k and 4k context, against a device-to-device copy of the same bytes timed in the same run.
   The copy's bandwidth counts bytes read + written (its real memory traffic); the ratio
   `attention / copy` is the fraction of achievable bandwidth the kernel reaches (goal >= 0.70 at 4k).
2. How much does shared-prefix (cascade) attention save when G samples share a prompt? Prompt 1k and
   4k, G 8 and 16, 256 own tokens per sample: time per decode step of the shared-prefix kernel vs the
   plain paged kernel over the same caches (goal <= 0.3 at prompt 4k, G 16), and vs a torch reference
   that gathers each sequence's K/V through its block table.

Every case also checks its outputs against the torch reference, so a fast wrong kernel fails loudly.
Timings are medians: from CUDA-graph replay (triton.testing.do_bench_cudagraph: GPU time, as a
graph-captured decode step sees it; the ratios use these) and, printed beside them, from eager
launches (triton.testing.do_bench), where Python launch cost shows when it exceeds the GPU time. Without CUDA the script says so, runs one tiny case
under the Triton interpreter as a sanity check, and exits 0.

    python bench/attention.py [--json results.json] [--sweep]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first triton import

import triton  # noqa: E402

from async_grpo.kv.shared_prefix import GroupLayout, shared_prefix_decode_attention  # noqa: E402
from async_grpo.kv.triton_paged import paged_decode_attention  # noqa: E402

HQ, HKV, HEAD_DIM, PAGE = 14, 2, 64, 16
NUM_SEQS = 256
OWN_TOKENS = 256
TOLERANCE = 2e-2  # bf16 outputs


def torch_gather_attention(q, k_cache, v_cache, block_tables, ctx_len, scale):
    """Reference for equal-length sequences: gather K/V [B, ctx, Hkv, D] through the tables, fp32 softmax."""
    B, Hq, D = q.shape
    Hkv = k_cache.shape[2]
    idx = block_tables.long()
    k = k_cache[idx].reshape(B, -1, Hkv, D)[:, :ctx_len]  # [B, ctx, Hkv, D]
    v = v_cache[idx].reshape(B, -1, Hkv, D)[:, :ctx_len]
    qg = q.view(B, Hkv, Hq // Hkv, D).float()  # [B, Hkv, gq, D]
    s = torch.einsum("bhgd,bnhd->bhgn", qg, k.float()) * scale  # [B, Hkv, gq, ctx]
    out = torch.einsum("bhgn,bnhd->bhgd", torch.softmax(s, dim=-1), v.float())
    return out.reshape(B, Hq, D).to(q.dtype)


def bench_ms(fn) -> float:
    """Median ms per call, launched from Python each time (CPU launch cost shows when it exceeds GPU time)."""
    return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")


def bench_graph_ms(fn) -> float:
    """Median ms per call replayed from a CUDA graph: the GPU time alone, as a graph-captured decode step sees it."""
    return triton.testing.do_bench_cudagraph(fn, rep=200, return_mode="median")


def plain_case(ctx_len: int, device: str, dtype=torch.bfloat16, num_seqs: int = NUM_SEQS, seed: int = 0):
    """Equal-length sequences, each on its own blocks in shuffled pool order."""
    g = torch.Generator(device=device).manual_seed(seed)
    per_seq = triton.cdiv(ctx_len, PAGE)
    num_blocks = num_seqs * per_seq
    k_cache = torch.randn(num_blocks, PAGE, HKV, HEAD_DIM, device=device, dtype=dtype, generator=g)
    v_cache = torch.randn(num_blocks, PAGE, HKV, HEAD_DIM, device=device, dtype=dtype, generator=g)
    tables = torch.randperm(num_blocks, device=device, generator=g).to(torch.int32).view(num_seqs, per_seq)
    lens = torch.full((num_seqs,), ctx_len, dtype=torch.int32, device=device)
    q = torch.randn(num_seqs, HQ, HEAD_DIM, device=device, dtype=dtype, generator=g)
    return q, k_cache, v_cache, tables, lens


def run_decode_bandwidth(ctx_len: int, sweep: bool) -> list[dict]:
    q, kc, vc, tables, lens = plain_case(ctx_len, "cuda")
    scale = HEAD_DIM**-0.5
    ref = torch_gather_attention(q, kc, vc, tables, ctx_len, scale)
    kv_bytes = 2 * NUM_SEQS * ctx_len * HKV * HEAD_DIM * kc.element_size()
    src = torch.empty(kv_bytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    copy_ms = bench_ms(lambda: dst.copy_(src))
    copy_bw = 2 * kv_bytes / (copy_ms * 1e-3)  # read + write
    del src, dst
    variants = [dict(num_splits=None, block_n=128)]
    if sweep:
        variants += [dict(num_splits=s, block_n=b) for b in (64, 128) for s in (1, 2, 4)]
    rows = []
    for v in variants:
        out = paged_decode_attention(q, kc, vc, tables, lens, scale, **v)
        err = (out.float() - ref.float()).abs().max().item()
        eager_ms = bench_ms(lambda: paged_decode_attention(q, kc, vc, tables, lens, scale, **v))
        ms = bench_graph_ms(lambda: paged_decode_attention(q, kc, vc, tables, lens, scale, **v))
        bw = kv_bytes / (ms * 1e-3)
        rows.append(dict(case="decode", ctx=ctx_len, **v, ms=ms, eager_ms=eager_ms, kv_gb=kv_bytes / 1e9,
                         attn_tb_s=bw / 1e12, copy_ms=copy_ms, copy_tb_s=copy_bw / 1e12, ratio_vs_copy=bw / copy_bw,
                         max_err=err))
        print(f"decode  ctx {ctx_len:5d} splits {str(v['num_splits']):>4} block_n {v['block_n']:3d}: "
              f"{ms * 1e3:7.1f} us (eager {eager_ms * 1e3:7.1f})  {bw / 1e12:5.2f} TB/s read | copy "
              f"{copy_bw / 1e12:5.2f} TB/s (r+w), same bytes {copy_ms * 1e3:7.1f} us | ratio {bw / copy_bw:5.2f} | "
              f"max err {err:.2e}", flush=True)
        if err > TOLERANCE:
            raise SystemExit(f"paged decode attention is wrong at ctx {ctx_len} ({v}): max error {err:.3e}")
    return rows


def shared_prefix_case(prompt: int, G: int, device: str, dtype=torch.bfloat16, num_seqs: int = NUM_SEQS, seed: int = 0):
    """num_seqs / G groups; each group's prompt blocks shared by its G samples, OWN_TOKENS own tokens each."""
    g = torch.Generator(device=device).manual_seed(seed)
    groups = num_seqs // G
    p_blocks, s_blocks = prompt // PAGE, triton.cdiv(OWN_TOKENS, PAGE)
    num_blocks = groups * p_blocks + num_seqs * s_blocks
    k_cache = torch.randn(num_blocks, PAGE, HKV, HEAD_DIM, device=device, dtype=dtype, generator=g)
    v_cache = torch.randn(num_blocks, PAGE, HKV, HEAD_DIM, device=device, dtype=dtype, generator=g)
    perm = torch.randperm(num_blocks, device=device, generator=g).to(torch.int32)
    prefix_tables = perm[: groups * p_blocks].view(groups, p_blocks)  # [Ngroups, P]
    suffix_tables = perm[groups * p_blocks :].view(num_seqs, s_blocks)  # [B, S]
    seq_group = torch.arange(num_seqs, device=device, dtype=torch.int32) // G  # [B]
    prefix_lens = torch.full((groups,), prompt, dtype=torch.int32, device=device)
    suffix_lens = torch.full((num_seqs,), OWN_TOKENS, dtype=torch.int32, device=device)
    full_tables = torch.cat([prefix_tables[seq_group.long()], suffix_tables], dim=1).contiguous()  # [B, P + S]
    full_lens = prefix_lens[seq_group.long()] + suffix_lens
    q = torch.randn(num_seqs, HQ, HEAD_DIM, device=device, dtype=dtype, generator=g)
    return q, k_cache, v_cache, prefix_tables, prefix_lens, seq_group, suffix_tables, suffix_lens, full_tables, full_lens


def run_shared_prefix(prompt: int, G: int, sweep: bool) -> list[dict]:
    q, kc, vc, ptab, plens, sg, stab, slens, ftab, flens = shared_prefix_case(prompt, G, "cuda")
    scale = HEAD_DIM**-0.5
    ctx = prompt + OWN_TOKENS
    # Built once per decode step by the engine and shared by all layers, so outside the timed call.
    layout = GroupLayout.build(sg.tolist(), ptab.shape[0], "cuda")

    def plain():
        return paged_decode_attention(q, kc, vc, ftab, flens, scale)

    def reference():
        return torch_gather_attention(q, kc, vc, ftab, ctx, scale)

    ref = reference()
    err_plain = (plain().float() - ref.float()).abs().max().item()
    t_plain, t_ref = bench_graph_ms(plain), bench_graph_ms(reference)
    t_plain_eager = bench_ms(plain)
    variants = [dict()]
    if sweep:
        variants += [dict(prefix_block_n=b, prefix_splits=s) for b in (64, 128) for s in (2, 4, 8, 16)]
    rows = []
    for v in variants:
        def shared():
            return shared_prefix_decode_attention(q, kc, vc, ptab, plens, layout, stab, slens, scale, **v)

        def serial():  # the same kernels, the suffix pass launched only after the prefix pass has ended
            return shared_prefix_decode_attention(q, kc, vc, ptab, plens, layout, stab, slens, scale,
                                                  overlap_passes=False, **v)

        err_shared = (shared().float() - ref.float()).abs().max().item()
        t_shared, t_shared_eager = bench_graph_ms(shared), bench_ms(shared)
        t_serial = bench_graph_ms(serial)
        # The same step with the prefix pass on the Triton kernel, where "auto" took the Gluon one.
        t_triton_prefix = bench_graph_ms(lambda: shared_prefix_decode_attention(
            q, kc, vc, ptab, plens, layout, stab, slens, scale, prefix_kernel="triton", **v))
        rows.append(dict(case="shared_prefix", prompt=prompt, G=G, own=OWN_TOKENS, **v, shared_ms=t_shared,
                         serial_launch_ms=t_serial, triton_prefix_ms=t_triton_prefix,
                         plain_ms=t_plain, torch_ms=t_ref, shared_eager_ms=t_shared_eager, plain_eager_ms=t_plain_eager,
                         shared_vs_plain=t_shared / t_plain, shared_vs_torch=t_shared / t_ref,
                         max_err_shared=err_shared, max_err_plain=err_plain))
        print(f"shared  prompt {prompt:5d} G {G:2d} {v or 'auto'}: shared {t_shared * 1e3:6.1f} us (serial launch "
              f"{t_serial * 1e3:6.1f}, Triton prefix kernel {t_triton_prefix * 1e3:6.1f}) | plain "
              f"{t_plain * 1e3:6.1f} us | torch gather {t_ref * 1e3:7.1f} us | shared/plain {t_shared / t_plain:5.3f} | "
              f"shared/torch {t_shared / t_ref:6.4f} | eager shared {t_shared_eager * 1e3:6.1f} plain "
              f"{t_plain_eager * 1e3:6.1f} us | max err {err_shared:.2e} / {err_plain:.2e}", flush=True)
        if max(err_shared, err_plain) > TOLERANCE:
            raise SystemExit(f"shared-prefix case prompt {prompt} G {G} {v} is wrong: errors {err_shared:.3e}, {err_plain:.3e}")
    return rows


def tune_shared_prefix(prompt: int, G: int) -> list[dict]:
    """Where the shared-prefix step's time goes, and which launch options are fastest.

    Breakdown: the whole step, then the same step with the suffix lengths zeroed (prefix kernel plus an
    empty suffix pass that only merges) and with the prefix lengths zeroed (suffix pass plus empty
    prefix programs). Then a grid over the prefix kernel's options with the suffix at its defaults, and a
    grid over the suffix pass's options with the best prefix options; every variant checked for errors.
    """
    q, kc, vc, ptab, plens, sg, stab, slens, ftab, flens = shared_prefix_case(prompt, G, "cuda")
    scale = HEAD_DIM**-0.5
    ref = torch_gather_attention(q, kc, vc, ftab, prompt + OWN_TOKENS, scale)
    layout = GroupLayout.build(sg.tolist(), ptab.shape[0], "cuda")
    t_plain = bench_graph_ms(lambda: paged_decode_attention(q, kc, vc, ftab, flens, scale))

    def timed(options: dict, p_lens=plens, s_lens=slens, check=True) -> float:
        def step():
            return shared_prefix_decode_attention(q, kc, vc, ptab, p_lens, layout, stab, s_lens, scale, **options)

        if check:
            err = (step().float() - ref.float()).abs().max().item()
            if err > TOLERANCE:
                raise SystemExit(f"shared-prefix prompt {prompt} G {G} {options}: max error {err:.3e}")
        return bench_graph_ms(step)

    whole = timed({})
    serial = timed(dict(overlap_passes=False), check=False)
    prefix_only = timed({}, s_lens=torch.zeros_like(slens), check=False)
    suffix_only = timed({}, p_lens=torch.zeros_like(plens), check=False)
    print(f"tune prompt {prompt} G {G}: plain {t_plain * 1e3:.1f} us | shared {whole * 1e3:.1f} us "
          f"(ratio {whole / t_plain:.3f}; serial launch {serial * 1e3:.1f} us) | prefix pass + empty suffix "
          f"{prefix_only * 1e3:.1f} us | suffix pass + empty prefix {suffix_only * 1e3:.1f} us", flush=True)
    rows = [dict(case="tune", prompt=prompt, G=G, plain_ms=t_plain, shared_ms=whole, serial_launch_ms=serial,
                 prefix_only_ms=prefix_only, suffix_only_ms=suffix_only)]
    # Splits None: one wave (choose_prefix_splits); warps None: prefix_launch_shape's warps and register cap.
    # Pipeline stages, plain 8 warps and loops without prefetching were slower on an H200.
    prefix_grid = [dict(prefix_block_n=b, prefix_splits=sp, max_tile_rows=r, prefix_num_warps=w)
                   for b in (64, 128) for sp in (None, 4, 8, 16) for r in (64, 128) for w in (None, 4)]
    results = []
    for options in prefix_grid:
        try:
            results.append((timed(options), options))
        except Exception as exc:  # a launch option the compiler rejects (e.g. out of shared memory)
            print(f"  skip {options}: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}")
    results.sort(key=lambda r: r[0])
    for ms, options in results[:6]:
        print(f"  prefix grid {ms * 1e3:6.1f} us ratio {ms / t_plain:.3f} {options}", flush=True)
    best_prefix = results[0][1]
    # One-warp programs with small tiles are what fits beside the Gluon prefix kernel (suffix_launch_shape).
    suffix_grid = [dict(best_prefix, block_n=b, suffix_num_warps=w, suffix_num_stages=st, partial_dtype=dt)
                   for b in (32, 64, 128) for w in (1, 2, 4) for st in (1, 2) for dt in (torch.float32, torch.bfloat16)]

    results = []
    for options in suffix_grid:
        try:
            results.append((timed(options), options))
        except Exception as exc:
            print(f"  skip {options}: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}")
    results.sort(key=lambda r: r[0])
    for ms, options in results[:6]:
        print(f"  suffix grid {ms * 1e3:6.1f} us ratio {ms / t_plain:.3f} {options}", flush=True)
    rows.append(dict(case="tune_best", prompt=prompt, G=G, shared_ms=results[0][0], plain_ms=t_plain,
                     options={k: str(v) for k, v in results[0][1].items()}))
    return rows


def interpreter_sanity() -> None:
    """A tiny case of each kernel under the interpreter, checked against the torch reference."""
    q, kc, vc, tables, lens = plain_case(40, "cpu", dtype=torch.float32, num_seqs=3)
    ref = torch_gather_attention(q, kc, vc, tables, 40, 0.125)
    err = (paged_decode_attention(q, kc, vc, tables, lens, 0.125, num_splits=2, block_n=16) - ref).abs().max().item()
    case = shared_prefix_case(32, 2, "cpu", dtype=torch.float32, num_seqs=4)
    q, kc, vc, ptab, plens, sg, stab, slens, ftab, _ = case
    ref_s = torch_gather_attention(q, kc, vc, ftab, 32 + OWN_TOKENS, 0.125)
    out_s = shared_prefix_decode_attention(q, kc, vc, ptab, plens, sg, stab, slens, 0.125, block_n=16)
    err_s = (out_s - ref_s).abs().max().item()
    print(f"interpreter sanity: paged max err {err:.2e}, shared-prefix max err {err_s:.2e}")
    if max(err, err_s) > 1e-4:
        raise SystemExit("interpreter sanity case failed")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", help="write the result rows to this file")
    parser.add_argument("--sweep", action="store_true", help="also time fixed splits and tile sizes")
    parser.add_argument("--tune", action="store_true",
                        help="only the shared-prefix breakdown and launch-option grids (cases: --tune-cases)")
    parser.add_argument("--tune-cases", default="4096x16,1024x16", help="PROMPTxG,... for --tune")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench/attention.py needs a CUDA GPU for timings; running a tiny interpreter sanity case instead.")
        interpreter_sanity()
        return 0
    props = torch.cuda.get_device_properties(0)
    print(f"device: {props.name}, {props.multi_processor_count} SMs; torch {torch.__version__}, triton {triton.__version__}")
    print(f"shape: {NUM_SEQS} sequences, {HQ} q heads / {HKV} kv heads, head_dim {HEAD_DIM}, bf16, block size {PAGE}")
    rows = []
    if args.tune:
        for case in args.tune_cases.split(","):
            prompt, G = (int(x) for x in case.split("x"))
            rows += tune_shared_prefix(prompt, G)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(rows, f, indent=1)
        return 0
    for ctx in (1024, 4096):
        rows += run_decode_bandwidth(ctx, args.sweep)
    for prompt in (1024, 4096):
        for G in (8, 16):
            rows += run_shared_prefix(prompt, G, args.sweep)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
