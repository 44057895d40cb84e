#!/usr/bin/env python3
"""Small CUDA cases of attention_with_scores, kcenter, bipartite_merge, recycle, region_attention and
dpp_select for compute-sanitizer.

    compute-sanitizer --tool memcheck  python tools/cuda_sanitize_cases.py
    compute-sanitizer --tool racecheck python tools/cuda_sanitize_cases.py
    compute-sanitizer --tool synccheck python tools/cuda_sanitize_cases.py
    compute-sanitizer --tool initcheck python tools/cuda_sanitize_cases.py

Covers every kernel variant (dtypes, attention full / causal / GQA / key bias / score rows /
Nq != Nk / head dims 32, 64, 80, 128, Gram and stream kcenter, isolated / mask / first
tensor, tome / spatial / protect, vector and scalar aggregation, assign / features, poisoned
rows, edge sizes) once, through the dispatcher and (with CuPy) the NVRTC path. Exits 0 when
every case ran; the sanitizer reports errors itself (use --error-exitcode 1).
"""
import sys

import torch

sys.path.insert(0, __import__("os").path.dirname(__import__("os").path.dirname(__import__("os").path.abspath(__file__))))

import tokenreduce  # noqa: E402,F401  (registers the ops)

DEV = "cuda"


def backends():
    out = {"dispatch": (torch.ops.tokenreduce.kcenter, torch.ops.tokenreduce.bipartite_merge,
                        torch.ops.tokenreduce.recycle, torch.ops.tokenreduce.attention_with_scores)}
    try:
        import cupy  # noqa: F401
        from tokenreduce.nvrtc.attention_with_scores import attention_with_scores_cuda
        from tokenreduce.nvrtc.bipartite_merge import bipartite_merge_cuda
        from tokenreduce.nvrtc.kcenter import kcenter_cuda
        from tokenreduce.nvrtc.recycle import recycle_cuda

        out["nvrtc"] = (kcenter_cuda, bipartite_merge_cuda, recycle_cuda, attention_with_scores_cuda)
    except Exception as e:  # no CuPy
        print(f"nvrtc path skipped: {e}")
    return out


def region_attention_impl(backend):
    if backend == "dispatch":
        return torch.ops.tokenreduce.region_attention
    from tokenreduce.nvrtc.region_attention import region_attention_cuda
    return region_attention_cuda


def main():
    g = torch.Generator(device=DEV).manual_seed(0)
    rnd = lambda *s, dt=torch.float32: torch.randn(*s, device=DEV, generator=g).to(dt)  # noqa: E731
    n = 0
    for name, (kc, bm, rc, att) in backends().items():
        def att_case(*args):  # a shape over a backend's limit is refused on the host: say so, go on
            try:
                att(*args)
            except ValueError as e:
                print(f"{name}: attention case refused: {str(e).splitlines()[0][:160]}")

        for dt in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
            # attention_with_scores: full / causal (bottom-right, Nq < Nk), GQA, key bias with -inf
            # (masked keys), [CLS] / last / repeated / negative score rows, odd sizes, head dims
            for Dh in (32, 64, 80, 128):
                q, kk, vv = rnd(2, 4, 37, Dh, dt=dt), rnd(2, 2, 37, Dh, dt=dt), rnd(2, 2, 37, Dh, dt=dt)
                att_case(q, kk, vv, Dh ** -0.5, False, None, None)
                att_case(q, kk, vv, Dh ** -0.5, True, None, None)
            q, kk, vv = rnd(2, 4, 19, 64, dt=dt), rnd(2, 4, 53, 64, dt=dt), rnd(2, 4, 53, 64, dt=dt)
            bias = torch.randn(2, 53, device=DEV, generator=g)
            bias[:, 5:9] = float("-inf")
            att_case(q, kk, vv, 0.125, True, bias, None)
            att_case(q, kk, vv, 0.125, False, bias, torch.tensor([0, -1, 3, 3], device=DEV))
            att_case(q, kk, vv, 0.125, True, None, torch.tensor([-1], device=DEV))
            q1 = rnd(1, 2, 1, 64, dt=dt)
            att_case(q1, rnd(1, 2, 1, 64, dt=dt), rnd(1, 2, 1, 64, dt=dt), 0.125, False, None, None)
            att_case(rnd(3, 16, 577, 64, dt=dt), rnd(3, 16, 577, 64, dt=dt), rnd(3, 16, 577, 64, dt=dt), 0.125,
                False, None, torch.tensor([0], device=DEV))
            # kcenter: Gram mode, odd sizes, isolated + mask, first tensor, a poisoned row
            x = rnd(3, 67, 19, dt=dt)
            mask = torch.rand(3, 67, device=DEV, generator=g) > 0.3
            kc(x, 9, "cosine", 0, None, True, mask)
            kc(x, 9, "l2", -1, None, False, None)
            kc(x, 67, "cosine", 0, torch.tensor([0, 5, 66], device=DEV), False, None)
            xp = x.clone()
            xp[1, 3, 0] = float("nan")
            kc(xp, 4, "cosine", 0, None, False, None)
            kc(rnd(1, 1, 3, dt=dt), 1, "cosine", 0, None, True, None)
            # bipartite_merge: orders, protect, size, metric of another dtype, vector + scalar rows
            x = rnd(4, 41, 32, dt=dt)
            for order in ("tome", "spatial"):
                for protect in (0, 1, 2):
                    bm(x, 10, None, None, protect, order)
            bm(x, 5, rnd(4, 41, 7), torch.rand(4, 41, device=DEV, generator=g) + 1, 1, "tome")
            bm(rnd(4, 41, 40, dt=dt)[:, :, 1:33], 12, None, None, 0, "spatial")
            bm(rnd(1, 2, 3, dt=dt), 1, None, None, 0, "tome")
            xp = x.clone()
            xp[2, 7, 1] = float("inf")
            bm(xp, 10, None, None, 1, "tome")
            # recycle: similarity, assign, features, weights, poisoned rows, empty sources
            x = rnd(3, 50, 24, dt=dt)
            perm = torch.stack([torch.randperm(50, device=DEV) for _ in range(3)])
            tgt, src = perm[:, :7].contiguous(), perm[:, 7:40].contiguous()
            w = torch.rand(3, 50, device=DEV, generator=g)
            rc(x, tgt, src, w, None, None, "cosine", True)
            rc(x, tgt, src, None, None, rnd(3, 50, 9, dt=torch.float64), "cosine", False)
            rc(x, tgt, src, w, torch.randint(-1, 7, (3, 33), device=DEV, generator=g), None, "cosine", True)
            rc(rnd(3, 50, 33, dt=dt)[:, :, 1:25], tgt, src, None, None, None, "cosine", True)
            bad = tgt.clone()
            bad[1, 0] = 50
            rc(x, bad, src, None, None, None, "cosine", True)
            rc(x, tgt, src[:, :0], None, None, None, "cosine", True)
            # region_attention: 2x2 / 3x3 windows, levels, heads, odd widths, strided rows, empty grid
            ra = region_attention_impl(name)
            for (gh, gw, s, L, C, Cv, h) in ((12, 12, 2, 1, 64, 64, 2), (3, 5, 3, 4, 33, 20, 1), (1, 1, 1, 1, 1, 1, 1)):
                N = gh * s * gw * s
                ra(rnd(2, gh * gw, C, dt=dt), rnd(2, L, N, C, dt=dt), rnd(2, L, N, Cv, dt=dt), gh, gw, s, h, 0.3)
            ra(rnd(2, 4, 20, dt=dt)[..., 2:18], rnd(2, 2, 16, 16, dt=dt), rnd(2, 2, 16, 32, dt=dt)[..., ::2],
               2, 2, 2, 4, 0.3)
            ra(rnd(2, 0, 8, dt=dt), rnd(2, 1, 0, 8, dt=dt), rnd(2, 1, 0, 8, dt=dt), 0, 3, 2, 2, 0.3)
            n += 1
        if name == "nvrtc":  # stream-mode kcenter kernels
            import tokenreduce.nvrtc.kcenter as nk

            nk.gram_budget_override = 0
            try:
                kc(rnd(2, 70, 16), 8, "cosine", 0, None, True, None)
                kc(rnd(2, 70, 16, dt=torch.bfloat16), 8, "l2", 0, None, False, None)
            finally:
                nk.gram_budget_override = None
        dpp = torch.ops.tokenreduce.dpp_select
        if name == "nvrtc":
            from tokenreduce.nvrtc.dpp_select import dpp_select_cuda as dpp
        for dt in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
            # dpp_select: relevance, mask, k above the eligible count, duplicates (gain 0), edge sizes
            x = rnd(3, 67, 19, dt=dt)
            mask = torch.rand(3, 67, device=DEV, generator=g) > 0.3
            dpp(x, 9, torch.rand(3, 67, device=DEV, generator=g), None)
            dpp(x, 60, None, mask)
            dpp(torch.cat([x[:, :5]] * 4, dim=1), 12, None, None)
            dpp(rnd(2, 130, 33, dt=dt)[:, :, 1:], 40, None, None)
            dpp(rnd(1, 1, 3, dt=dt), 1, None, None)
        torch.cuda.synchronize()
        print(f"{name}: {n} dtype rounds ran")
    return 0


if __name__ == "__main__":
    sys.exit(main())
