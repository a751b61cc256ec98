"""The Triton kernels against their torch references, and the engine on them.

Runs on CUDA when there is one (compiled), else on the CPU through the Triton interpreter,
which triton enables only with ``TRITON_INTERPRET=1`` set before it is imported: so this file
is not collected by a plain ``pytest`` run (no ``test_`` prefix); ``test_triton_kernels.py``
runs it in a subprocess with the right environment, and ``benchmarks/gpu_check.sh`` on a GPU.

References get the kernels' own (rounded) inputs, computed in float32, and are compared with
a tolerance per dtype.
"""

from __future__ import annotations

import math

import pytest
import torch
from support import (
    PeftReference,
    check_output,
    random_prompt,
    save_random_adapter,
    save_random_dora_adapter,
    save_random_llama,
    scored,
)

from pagedlora import AdapterMix, Engine, SamplingParams
from pagedlora.kernels import lora as ref_lora
from pagedlora.kernels import paged_attention as ref_attn
from pagedlora.kernels import triton_attention, triton_lora
from pagedlora.kernels.lora import LoraBatch, LoraSegment, PagedRows
from pagedlora.lora_adapter import TARGET_MODULES

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16"),
          pytest.param(torch.float16, id="fp16")]
# (atol, rtol): bfloat16 keeps 8 significant bits, float16 11; the kernels round once at the
# end, or (on GPUs) also attention probabilities and the shrink output before the second product.
TOL = {torch.float32: (2e-4, 1e-4), torch.bfloat16: (3e-2, 2e-2), torch.float16: (4e-3, 3e-3)}


def assert_close(got: torch.Tensor, want: torch.Tensor) -> None:
    atol, rtol = TOL[got.dtype]
    torch.testing.assert_close(got.float(), want.float(), atol=atol, rtol=rtol)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# -- KV write --------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_tokens, kv_heads, head_dim", [(1, 2, 16), (7, 3, 24), (33, 2, 64)])
def test_write_kv_scatters_exactly_like_the_reference(num_tokens, kv_heads, head_dim, dtype):
    g = gen(num_tokens)
    pages = torch.zeros(40, 2, 4, kv_heads, head_dim, dtype=dtype)
    slots = torch.randperm(40 * 4, generator=g)[:num_tokens]
    # k and v as the model passes them: head-contiguous slices of a wider qkv row
    qkv = torch.randn(num_tokens, 3 * kv_heads * head_dim + 5, generator=g).to(dtype)
    k = qkv[:, : kv_heads * head_dim].view(num_tokens, kv_heads, head_dim)
    v = qkv[:, 5 + kv_heads * head_dim: 5 + 2 * kv_heads * head_dim].view(
        num_tokens, kv_heads, head_dim)
    want = pages.clone()
    ref_attn.write_kv(want, slots // 4, slots % 4, k, v)
    got = pages.to(DEVICE)
    triton_attention.write_kv(got, (slots // 4).to(DEVICE), (slots % 4).to(DEVICE),
                              k.to(DEVICE), v.to(DEVICE))
    assert torch.equal(got.cpu(), want)


def test_wrappers_name_what_they_cannot_take():
    pages = torch.zeros(4, 2, 4, 2, 16, device=DEVICE)
    k = torch.zeros(3, 2, 16, device=DEVICE)
    idx = torch.zeros(3, dtype=torch.long, device=DEVICE)
    with pytest.raises(ValueError, match="k must be torch.float32, got torch.float16"):
        triton_attention.write_kv(pages, idx, idx, k.half(), k)
    with pytest.raises(ValueError, match="slot_offsets has 2 entries for 3 tokens"):
        triton_attention.write_kv(pages, idx, idx[:2], k, k)
    q = torch.zeros(3, 3, 16, device=DEVICE)
    meta = ref_attn.attention_metadata(*(torch.ones(1, dtype=torch.long, device=DEVICE),) * 3,
                                       4)
    with pytest.raises(ValueError, match="num_heads a multiple of num_kv_heads=2"):
        triton_attention.paged_attention(q, pages, idx[:1, None], meta, 1.0)


# -- paged attention -------------------------------------------------------------------------------


def attention_case(shapes, heads, kv_heads, head_dim, block_size, dtype, seed):
    """K/V of sequences ``(context already in pages, new tokens)`` written into random pages;
    returns ``(q, kv_pages, block_tables, meta)`` on DEVICE."""
    g = gen(seed)
    blocks_per_seq = [math.ceil((c + n) / block_size) for c, n in shapes]
    free = torch.randperm(sum(blocks_per_seq) + 3, generator=g).tolist()
    kv_pages = torch.randn(len(free), 2, block_size, kv_heads, head_dim, generator=g).to(dtype)
    tables = [[free.pop() for _ in range(b)] for b in blocks_per_seq]
    width = max(blocks_per_seq)
    block_tables = torch.tensor([t + [0] * (width - len(t)) for t in tables])
    q_lens = torch.tensor([n for _, n in shapes])
    q = torch.randn(int(q_lens.sum()), heads, head_dim, generator=g).to(dtype)
    meta = ref_attn.attention_metadata((q_lens.cumsum(0) - q_lens).to(DEVICE), q_lens.to(DEVICE),
                                       torch.tensor([c + n for c, n in shapes], device=DEVICE),
                                       width * block_size)
    return q.to(DEVICE), kv_pages.to(DEVICE), block_tables.to(DEVICE), meta


def check_attention(q, kv_pages, block_tables, meta):
    scale = q.shape[-1] ** -0.5
    got = triton_attention.paged_attention(q, kv_pages, block_tables, meta, scale)
    want = ref_attn.paged_attention(q.float(), kv_pages.float(), block_tables, meta, scale)
    assert got.shape == want.shape and got.dtype == q.dtype
    assert_close(got, want)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_seqs, heads, kv_heads, head_dim, block_size, max_ctx", [
    (1, 4, 4, 16, 16, 90), (7, 8, 2, 64, 16, 90), (33, 6, 2, 24, 4, 90),
    (2, 8, 1, 64, 16, 700)])  # few programs over long contexts: the keys split in ranges
def test_decode_attention_matches_reference(num_seqs, heads, kv_heads, head_dim, block_size,
                                            max_ctx, dtype):
    g = gen(num_seqs)
    shapes = [(int(c), 1) for c in torch.randint(0, max_ctx, (num_seqs,), generator=g)]
    check_attention(*attention_case(shapes, heads, kv_heads, head_dim, block_size, dtype,
                                    seed=num_seqs))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads, kv_heads, head_dim, block_size", [(6, 2, 24, 4),
                                                                   (8, 1, 64, 16)])
def test_prefill_attention_over_earlier_context_matches_reference(heads, kv_heads, head_dim,
                                                                  block_size, dtype):
    # fresh prompts, chunks after earlier chunks (context in pages), a cached prefix, decodes
    shapes = [(0, 7), (5, 6), (12, 1), (0, 1), (64, 40), (33, 70), (0, 19)]
    check_attention(*attention_case(shapes, heads, kv_heads, head_dim, block_size, dtype,
                                    seed=heads))


# -- LoRA shrink/expand ----------------------------------------------------------------------------


def assign_tokens(num_tokens: int, num_adapters: int, popularity: str, g) -> list[int | None]:
    """Adapter index (None: base model) of each token, contiguous runs as the runner builds."""
    if popularity == "identical":
        return [0] * num_tokens
    if popularity == "distinct":  # every adapter used, runs as even as the tokens allow
        return [i * num_adapters // num_tokens for i in range(num_tokens)] if \
            num_tokens >= num_adapters else list(range(num_tokens))
    weights = 1.0 / torch.arange(1, num_adapters + 1, dtype=torch.float) ** 1.5  # zipf
    picks = torch.multinomial(weights, num_tokens, replacement=True, generator=g).tolist()
    if popularity == "with_base":  # a third of the tokens on the base model, interleaved
        return [None if i % 3 == 1 else p for i, p in enumerate(picks)]
    return sorted(picks)


def lora_case(num_tokens, in_f, out_f, ranks, popularity, dtype, seed):
    """Random adapters of ``ranks`` scattered over pool pages, tokens assigned by popularity.

    Returns:
        ``(y, x, batch, a_view, b_view, owner)`` on DEVICE (float32 token_scale), ``owner``
        from :func:`assign_tokens`.
    """
    g = gen(seed)
    page_numel = 3 * max(in_f, out_f)  # pages of 3 rows or more, as UnifiedPool.rows views
    rows_a, rows_b = page_numel // in_f, page_numel // out_f
    total = sum(ranks)
    pages_a, pages_b = math.ceil(total / rows_a), math.ceil(total / rows_b)
    num_pages = pages_a + pages_b + 4

    def views(pool: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return (pool[:, : rows_a * in_f].view(num_pages, rows_a, in_f),
                pool[:, : rows_b * out_f].view(num_pages, rows_b, out_f))

    pool = torch.zeros(num_pages, page_numel, dtype=dtype)
    a_view, b_view = views(pool)
    places = torch.randperm(num_pages, generator=g)
    a_flat = torch.randperm(pages_a * rows_a, generator=g)[:total]
    b_flat = torch.randperm(pages_b * rows_b, generator=g)[:total]
    a_rows = PagedRows(places[a_flat // rows_a], a_flat % rows_a)
    b_rows = PagedRows(places[pages_a:][b_flat // rows_b], b_flat % rows_b)
    a_view[a_rows.pages, a_rows.slots] = (torch.randn(total, in_f, generator=g)
                                          / in_f ** 0.5).to(dtype)
    b_view[b_rows.pages, b_rows.slots] = torch.randn(total, out_f, generator=g).to(dtype)
    cols = torch.tensor([0, *ranks]).cumsum(0).tolist()
    owner = assign_tokens(num_tokens, len(ranks), popularity, g)
    segments, t = [], 0
    while t < num_tokens:
        end = t
        while end < num_tokens and owner[end] == owner[t]:
            end += 1
        if owner[t] is not None:
            i = owner[t]
            segments.append(LoraSegment(t, end, cols[i], cols[i + 1], 0.5 + i / ranks[i]))
        t = end
    token_scale = torch.zeros(num_tokens, total, device=DEVICE)
    for s in segments:
        token_scale[s.start:s.end, s.col_start:s.col_end] = s.scale
    batch = LoraBatch(*(PagedRows(r.pages.to(DEVICE), r.slots.to(DEVICE))
                        for r in (a_rows, b_rows)), tuple(segments), token_scale)
    x = torch.randn(num_tokens, in_f, generator=g).to(dtype).to(DEVICE)
    y = torch.randn(num_tokens, out_f, generator=g).to(dtype).to(DEVICE)
    return (y, x, batch, *views(pool.to(DEVICE)), owner)


LORA_CASES = [  # (tokens, in_features, out_features, ranks, popularity)
    (1, 64, 96, [1], "identical"),
    (7, 96, 64, [1, 3, 8, 16, 64, 128, 8], "distinct"),
    (7, 64, 2049, [128, 3], "with_base"),
    (33, 2049, 96, [3, 16, 64], "zipf"),
    (33, 96, 64, [8, 16, 3, 1], "with_base"),
    (33, 64, 96, [16], "identical"),
    (1, 2049, 2049, [64], "identical"),
    (33, 96, 96, [1, 3, 8, 16, 64, 128] * 5, "distinct"),
    (33, 64, 64, [8, 8, 8, 8], "zipf"),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_tokens, in_f, out_f, ranks, popularity", LORA_CASES)
def test_lora_shrink_expand_matches_reference(num_tokens, in_f, out_f, ranks, popularity,
                                              dtype):
    y, x, batch, a_view, b_view, owner = lora_case(num_tokens, in_f, out_f, ranks, popularity,
                                                   dtype, seed=num_tokens + in_f)
    want = y.clone().float()  # the reference adds in place
    ref_lora.lora_shrink_expand(want, x.float(), batch, a_view.float(), b_view.float())
    got = y.clone()
    triton_lora.lora_shrink_expand(got, x, batch, a_view, b_view)
    assert_close(got, want)
    base = torch.tensor([o is None for o in owner], device=DEVICE)
    assert torch.equal(got[base], y[base])  # base-model tokens untouched


def in_pieces(view: torch.Tensor, rows: PagedRows, pieces: int, seed: int
              ) -> tuple[torch.Tensor, PagedRows]:
    """The rows ``rows`` of ``view`` copied into a fresh pool in ``pieces`` equal pieces at
    random pages and slots, as ``row_pieces(narrow=True)`` stores them; returns the fresh
    pool's view as pieces and their ``[r, pieces]`` page table, on DEVICE."""
    g = gen(seed)
    whole = view[rows.pages, rows.slots].cpu()                        # [r, width]
    r, width = whole.shape
    piece = width // pieces
    assert piece * pieces == width
    page_numel = view.stride(0)
    per_page = page_numel // piece
    num_pages = math.ceil(r * pieces / per_page) + 3
    spots = torch.randperm(num_pages * per_page, generator=g)[: r * pieces]
    pool = torch.zeros(num_pages, page_numel, dtype=view.dtype)
    pieced = pool[:, : per_page * piece].view(num_pages, per_page, piece)
    table = PagedRows((spots // per_page).view(r, pieces), (spots % per_page).view(r, pieces))
    pieced[table.pages, table.slots] = whole.view(r, pieces, piece)
    return pieced.to(DEVICE), PagedRows(table.pages.to(DEVICE), table.slots.to(DEVICE))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_tokens, in_f, out_f, ranks, popularity, pieces", [
    (7, 96, 64, [1, 3, 8, 16, 64, 128, 8], "distinct", (3, 4)),   # pieces of 32 and 16
    (33, 2049, 96, [3, 16, 64], "zipf", (3, 1)),                  # 3 x 683: odd, lora_A only
    (33, 64, 2049, [128, 3], "with_base", (1, 3)),                # lora_B^T only
    (1, 96, 96, [16], "identical", (6, 2)),
])
def test_lora_over_rows_in_narrow_pieces_matches_whole_rows(num_tokens, in_f, out_f, ranks,
                                                            popularity, pieces, dtype):
    """Rows split into equal pieces, each at its own page and slot
    (``row_pieces(narrow=True)``), read in place: the reference runs on the same rows whole."""
    y, x, batch, a_view, b_view, owner = lora_case(num_tokens, in_f, out_f, ranks, popularity,
                                                   dtype, seed=num_tokens + out_f)
    want = y.clone().float()
    ref_lora.lora_shrink_expand(want, x.float(), batch, a_view.float(), b_view.float())
    (a_pieced, a_rows), (b_pieced, b_rows) = (
        in_pieces(view, rows, p, seed=p) if p > 1 else (view, rows)
        for view, rows, p in ((a_view, batch.a, pieces[0]), (b_view, batch.b, pieces[1])))
    got = y.clone()
    triton_lora.lora_shrink_expand(got, x, LoraBatch(a_rows, b_rows, batch.segments, None),
                                   a_pieced, b_pieced)
    assert_close(got, want)
    base = torch.tensor([o is None for o in owner], device=DEVICE)
    assert torch.equal(got[base], y[base])
    if pieces[0] > 1:  # a table of pieces with the view of whole rows is refused, named
        with pytest.raises(ValueError, match=f"a_view's rows are {in_f} wide: {pieces[0]} "
                                             f"piece\\(s\\) of them do not make"):
            triton_lora.lora_shrink(x, LoraBatch(a_rows, b_rows, batch.segments, None), a_view)


def test_lora_over_pieces_in_a_view_with_padded_slots_matches_whole_rows():
    """The piece width is the view's row width, not its slot stride: pieces of 32 in slots
    37 elements apart (a reviewer's case; the kernels once divided by the stride)."""
    y, x, batch, a_view, b_view, _ = lora_case(7, 96, 64, [3, 8, 5], "distinct",
                                               torch.float32, seed=11)
    want = y.clone()
    ref_lora.lora_shrink_expand(want, x, batch, a_view, b_view)
    views = []
    for view, rows, p in ((a_view, batch.a, 3), (b_view, batch.b, 2)):
        pieced, table = in_pieces(view, rows, p, seed=p)
        padded = torch.zeros(*pieced.shape[:2], pieced.shape[2] + 5, device=DEVICE)
        padded[..., : pieced.shape[2]] = pieced
        views.append((padded[..., : pieced.shape[2]], table))
    (a_padded, a_rows), (b_padded, b_rows) = views
    assert a_padded.stride(1) == 37 and a_padded.shape[2] == 32
    got = y.clone()
    triton_lora.lora_shrink_expand(got, x, LoraBatch(a_rows, b_rows, batch.segments, None),
                                   a_padded, b_padded)
    assert_close(got, want)


@pytest.mark.parametrize("dtype", DTYPES)
def test_lora_with_tokens_of_mixes_matches_reference(dtype):
    """Tokens of a mix are in one segment per adapter (weighted scales): adapter 0's tokens
    also use adapters 2 and 3, adapter 1's adapter 2, adapter 2's adapter 3; the tokens of
    the last run are left on the base model."""
    y, x, batch, a_view, b_view, _ = lora_case(33, 96, 64, [8, 16, 3, 1], "distinct", dtype,
                                               seed=7)
    s0, s1, s2, s3 = batch.segments
    c2, c3 = s2.col_start, s3.col_start
    segments = (s0, s1, s2, LoraSegment(s0.start, s0.end, c2, c2 + 3, -0.5),
                LoraSegment(s1.start, s1.end, c2, c2 + 3, 0.5),
                LoraSegment(s0.start, s0.end, c3, c3 + 1, 0.75),
                LoraSegment(s2.start, s2.end, c3, c3 + 1, 1.25))
    def scales(segments) -> torch.Tensor:
        token_scale = torch.zeros_like(batch.token_scale)
        for s in segments:
            token_scale[s.start:s.end, s.col_start:s.col_end] = s.scale
        return token_scale
    mixed = LoraBatch(batch.a, batch.b, segments, scales(segments))
    assert len(triton_lora.disjoint_groups(segments)) == 3
    want = y.clone().float()
    ref_lora.lora_shrink_expand(want, x.float(), mixed, a_view.float(), b_view.float())
    got = y.clone()
    triton_lora.lora_shrink_expand(got, x, mixed, a_view, b_view)
    assert_close(got, want)
    assert torch.equal(got[s3.start:s3.end], y[s3.start:s3.end])  # base tokens untouched
    unmixed = y.clone().float()
    ref_lora.lora_shrink_expand(unmixed, x.float(), LoraBatch(
        batch.a, batch.b, (s0, s1, s2), scales((s0, s1, s2))), a_view.float(), b_view.float())
    assert (unmixed - want).abs().max() > 10 * TOL[dtype][0]  # the mix's terms count


# -- the engine ------------------------------------------------------------------------------------

ALL = list(TARGET_MODULES)  # the seven decoder projections


def test_engine_on_triton_kernels_gives_the_torch_tokens(tiny_llama_dir, make_adapter,
                                                         tmp_path, monkeypatch):
    """Plain adapters, a DoRA adapter (its scale rows read through page tables) and mixes
    (segments that overlap, in successive launches) beside base requests. The LoRA calls
    build no segment table of their own (one copy per step, by the runner's layouts)."""
    dirs = {"r8": make_adapter(tiny_llama_dir, "r8", r=8, target_modules=ALL, seed=1),
            "r3": make_adapter(tiny_llama_dir, "r3", r=3, seed=2,
                               target_modules=["q_proj", "v_proj", "down_proj"]),
            "dora": save_random_dora_adapter(tiny_llama_dir, tmp_path / "dora", r=4, seed=3,
                                             target_modules=["q_proj", "o_proj", "up_proj"]),
            # vocabulary modules: torch ops on rows read out of the pool, on either backend
            "v4": make_adapter(tiny_llama_dir, "v4", r=4, seed=4,
                               target_modules=["embed_tokens", "lm_head", "k_proj"])}
    prompts = [random_prompt(n, seed=n) for n in (3, 17, 40, 9, 25, 3, 12, 11)]
    adapters = ["r8", None, "r3", AdapterMix({"r8": 0.5, "r3": -1.0}), "dora", None, "v4",
                AdapterMix({"r3": 0.5, "v4": 0.75})]
    greedy = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, logprobs=2)
    logprobs = {}
    tokens = {}
    built = []
    monkeypatch.setattr(triton_lora, "segment_tensors",
                        lambda *a, _f=triton_lora.segment_tensors: built.append(1) or _f(*a))
    for backend in ("torch", "triton"):
        # 24 tokens a step: the 40- and 25-token prompts are prefilled in chunks next to decodes
        engine = Engine(tiny_llama_dir, pool_gb=0.02, block_size=8, max_model_len=128,
                        max_num_batched_tokens=24, device=DEVICE.type, dtype="float32",
                        kernel_backend=backend)
        assert engine.model.kernels.backend == backend
        for name, path in dirs.items():
            engine.add_adapter(name, path)
        outs = engine.generate(prompts, adapters=adapters, sampling_params=greedy,
                               progress=False)
        tokens[backend] = [o.token_ids for o in outs]
        logprobs[backend] = torch.tensor([[e.logprob for e in o.logprobs] for o in outs])
    assert tokens["triton"] == tokens["torch"]
    assert not built, f"{len(built)} LoRA calls copied their own segment table"
    assert tokens["torch"][0] != tokens["torch"][5]  # the adapter changes the tokens
    torch.testing.assert_close(logprobs["triton"], logprobs["torch"], atol=1e-3, rtol=0)


def test_engine_on_triton_kernels_over_rows_in_narrow_pieces_matches_peft(default_model_dir,
                                                                          tmp_path):
    """A tiny Llama whose widths leave page slack (hidden 96 on 1,024-element pages: 96-wide
    rows in 3 pieces of 32, intermediate 176 in 11 of 16, k/v's 32 whole): the Triton kernels
    read the pieces in place, beside DoRA scale rows in pieces and base requests, against
    PEFT (mixes on Triton: the test above)."""
    model = save_random_llama(tmp_path / "model", default_model_dir, seed=7, hidden_size=96,
                              num_attention_heads=6, num_key_value_heads=2)
    dirs = {"all": save_random_adapter(model, tmp_path / "all", r=5, seed=31,
                                       target_modules=ALL),
            "qv": save_random_adapter(model, tmp_path / "qv", r=2, seed=32,
                                      target_modules=["q_proj", "v_proj"]),
            "dora": save_random_dora_adapter(model, tmp_path / "dora", r=3, seed=33,
                                             target_modules=["o_proj", "gate_proj",
                                                             "down_proj"])}
    engine = Engine(model, pool_gb=0.05, max_lora_rank=8, device=DEVICE.type,
                    dtype="float32", kernel_backend="triton")
    assert engine.pool.page_numel == 1024
    for name, path in dirs.items():
        engine.add_adapter(name, path)
    prompts = [random_prompt(5 + 3 * i, seed=60 + i) for i in range(5)]
    adapters = ["all", None, "qv", "dora", "all"]
    ask = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True, logprobs=3,
                         prompt_logprobs=3)
    outs = engine.generate(prompts, adapters=adapters, sampling_params=ask, progress=False)
    resident = engine.adapters.resident(engine.adapters.key_of("all"))
    assert resident.modules[(0, "q_proj")].a.pages.shape == (5, 3)       # in pieces
    assert resident.modules[(0, "down_proj")].a.pages.shape == (5, 11)
    assert resident.modules[(0, "k_proj")].b.pages.shape == (5,)         # 32 divides a page
    dora = engine.adapters.resident(engine.adapters.key_of("dora"))
    assert dora.modules[(0, "o_proj")].dora.pages.shape == (1, 3)
    ref = PeftReference(model, dirs)
    for o in outs:
        check_output(o, scored(ref, o))
