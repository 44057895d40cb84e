"""Kernel name expressions of the NVRTC fallback, per device source (torch-free).

Keys are paths relative to ``csrc/``; values are the C++ name expressions that
``cupy.RawModule(name_expressions=...)`` instantiates. ``tools/cuda_compile_check.sh``
reads this file (with plain Python, no torch) to check that every expression compiles.
"""

# C++ storage type of each torch dtype name the kernels are instantiated for
CTYPES = {"float32": "float", "float16": "__half", "bfloat16": "__nv_bfloat16", "float64": "double"}
ACC = {"float": "float", "__half": "float", "__nv_bfloat16": "float", "double": "double"}
VEC = {"float": 4, "__half": 8, "__nv_bfloat16": 8, "double": 2}  # elements per 16-byte access

_KC = "tokenreduce::cuda::kcenter::"
_BM = "tokenreduce::cuda::bipartite_merge::"
_RC = "tokenreduce::cuda::recycle::"


def kcenter_names(t: str) -> dict:
    a = ACC[t]
    return {
        "sqnorm": f"{_KC}kcenter_sqnorm<{t}>",
        "gram": f"{_KC}kcenter_gram<{t}>",
        "nn_gram": f"{_KC}kcenter_nn_gram<{a}>",
        "nn_stream": f"{_KC}kcenter_nn_stream<{t}>",
        "select_gram": f"{_KC}kcenter_select<{t}, false>",
        "select_stream": f"{_KC}kcenter_select<{t}, true>",
    }


def bipartite_merge_names(t: str) -> dict:
    a = ACC[t]
    return {
        "inv_norm": f"{_BM}bm_inv_norm<{t}>",
        "match": f"{_BM}bm_match<{t}>",
        "plan": f"{_BM}bm_plan<{a}>",
        "merge": f"{_BM}bm_merge<{t}, 1>",
        "merge_vec": f"{_BM}bm_merge<{t}, {VEC[t]}>",
    }


def recycle_names(t: str) -> dict:
    return {
        "inv_norm": f"{_RC}rc_inv_norm<{t}>",
        "assign": f"{_RC}rc_assign<{t}>",
        "plan": f"{_RC}rc_plan",
        "aggregate": f"{_RC}rc_aggregate<{t}, 1>",
        "aggregate_vec": f"{_RC}rc_aggregate<{t}, {VEC[t]}>",
    }


_RA = "tokenreduce::cuda::region_attention::"


def region_attention_names(t: str) -> dict:
    return {"forward": f"{_RA}ra_forward<{t}>"}
_DPP = "tokenreduce::cuda::dpp::"


def dpp_select_names(t: str) -> dict:
    return {
        "norms": f"{_DPP}dpp_norms<{t}>",
        "greedy": f"{_DPP}dpp_greedy<{t}>",
    }


_AT = "tokenreduce::attn::"


def attention_with_scores_names(t: str) -> dict:
    return {
        "fwd": f"{_AT}attn_fwd_kernel<{t}>",
        "colscore": f"{_AT}attn_colscore_kernel<{t}>",
        "reduce": f"{_AT}attn_reduce_scores_kernel<{ACC[t]}>",
    }


SOURCES = {
    "attention_with_scores/attention_with_scores_kernels.cuh": attention_with_scores_names,
    "kcenter/kcenter_kernels.cuh": kcenter_names,
    "bipartite_merge/bipartite_merge_kernels.cuh": bipartite_merge_names,
    "recycle/recycle_kernels.cuh": recycle_names,
    "region_attention/region_attention_kernels.cuh": region_attention_names,
    "dpp_select/dpp_select_kernels.cuh": dpp_select_names,
}


def _all(fn) -> list:
    out = []
    for t in CTYPES.values():
        for e in fn(t).values():
            if e not in out:
                out.append(e)
    return out


NAME_EXPRESSIONS = {src: _all(fn) for src, fn in SOURCES.items()}
