"""Every fused kernel against its eager reference, forward and backward, on CPU.

The Triton kernels run through the Triton interpreter (TRITON_INTERPRET=1, set below before any Triton
kernel module is imported), so these tests exercise the same kernel source the GPU compiles.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first import of the Triton kernels

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from internlm2.core import kernels
from internlm2.core.kernels import (
    add_rms_norm,
    apply_rotary,
    fused_cross_entropy,
    fused_linear_cross_entropy,
    reference,
    rms_norm,
    swiglu,
    use_backend,
)

pytestmark = pytest.mark.timeout(60)

TOL = {
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.float16: dict(rtol=2e-3, atol=2e-3),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2),
}


@pytest.fixture(autouse=True)
def _restore_backend():
    yield
    kernels.set_backend("auto")


class OpRecorder(TorchDispatchMode):
    """Records (op name, output shape, output bytes) of every aten op run inside it, autograd's backward
    included. Bytes, not elements: the Triton interpreter copies arguments through byte-typed storages."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[str, tuple[int, ...], int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.calls.append((str(func.overloadpacket), tuple(t.shape), t.numel() * t.element_size()))
        return out


def _leaves(*tensors):
    """Leaf copies with the exact strides of the originals (clone() would densify gapped views)."""
    copies = [torch.empty_strided(t.shape, t.stride(), dtype=t.dtype).copy_(t) for t in tensors]
    return [c.requires_grad_(c.is_floating_point()) for c in copies]


def _run(backend, fn, inputs, grad_outs, n_grad, **kwargs):
    """Runs ``fn`` under ``backend`` on fresh leaf copies of the first ``n_grad`` inputs; returns
    (outputs, their grads)."""
    leaves = _leaves(*inputs[:n_grad])
    with use_backend(backend):
        out = fn(*leaves, *inputs[n_grad:], **kwargs)
        outs = out if isinstance(out, tuple) else (out,)
        torch.autograd.backward(list(outs), list(grad_outs))
    return [o.detach() for o in outs], [t.grad for t in leaves]


def _assert_close(actual, expected, dtype, what, scale_atol=False):
    tol = dict(TOL[dtype])
    if scale_atol:  # reductions (weight grads): tolerance relative to the tensor's magnitude
        tol["atol"] = tol["atol"] * max(1.0, expected.abs().max().item())
    torch.testing.assert_close(actual.float(), expected.float(), **tol, msg=lambda m: f"{what}: {m}")


def _compare(fn, inputs, dtype, n_grad=None, reduce_grads=(), **kwargs):
    """Triton vs eager on ``fn``: every output and the gradient of each of the first ``n_grad`` inputs
    (default: all)."""
    n_grad = len(inputs) if n_grad is None else n_grad
    with torch.no_grad(), use_backend("eager"):
        ref = fn(*inputs, **kwargs)
    ref = ref if isinstance(ref, tuple) else (ref,)
    grad_outs = [torch.randn(r.shape, dtype=r.dtype) for r in ref]
    ref_out, ref_grads = _run("eager", fn, inputs, grad_outs, n_grad, **kwargs)
    tri_out, tri_grads = _run("triton", fn, inputs, grad_outs, n_grad, **kwargs)
    for i, (a, e) in enumerate(zip(tri_out, ref_out)):
        assert (a.dtype, a.shape) == (e.dtype, e.shape), f"output {i}: {a.dtype}{a.shape}, {e.dtype}{e.shape}"
        _assert_close(a, e, dtype, f"output {i}")
        if dtype != torch.float32:
            # The kernels round where the official model rounds, so half-precision outputs are bit-identical
            # up to rare 1-ulp flips from fp32 transcendental/reduction-order differences.
            exact = (a == e).float().mean().item()
            assert exact >= 0.995, f"output {i}: only {exact:.4f} of elements bit-identical to eager"
    assert len(tri_grads) == len(ref_grads)
    for i, (a, e) in enumerate(zip(tri_grads, ref_grads)):
        assert a is not None and e is not None, f"grad {i} missing"
        assert a.dtype == e.dtype and a.shape == e.shape
        _assert_close(a, e, dtype, f"grad {i}", scale_atol=i in reduce_grads)


# ------------------------------------------------------------------------------------------------ dispatch
def test_backend_state_is_explicit_and_scoped():
    assert kernels.get_backend() == "auto"
    with use_backend("triton"):
        assert kernels.get_backend() == "triton"
        with use_backend("eager"):
            assert kernels.get_backend() == "eager"
        assert kernels.get_backend() == "triton"
    assert kernels.get_backend() == "auto"
    kernels.set_backend("eager")
    assert kernels.get_backend() == "eager"
    with pytest.raises(ValueError, match="backend must be one of"):
        kernels.set_backend("cuda")


def test_interpreter_runs_triton_path_on_cpu():
    """Guards every other test here: 'triton' on CPU must really launch the (interpreted) Triton kernel."""
    assert kernels.triton_usable_on_cpu(), "TRITON_INTERPRET=1 did not take effect before the kernel import"
    x, w = torch.randn(4, 176), torch.randn(176)
    for backend, expect_eager_ops in (("triton", False), ("auto", True), ("eager", True)):
        with use_backend(backend), OpRecorder() as rec:
            rms_norm(x, w, 1e-6)
        ran_eager = any(name == "aten.rsqrt" for name, _, _ in rec.calls)
        assert ran_eager == expect_eager_ops, f"backend {backend}: eager ops ran={ran_eager}"
        with use_backend(backend):
            assert kernels.active_path(x, w) == ("eager" if expect_eager_ops else "triton")


def test_triton_backend_rejects_unsupported_arguments():
    with use_backend("triton"), pytest.raises(ValueError, match="share shape and dtype"):
        swiglu(torch.randn(2, 8), torch.randn(2, 8, dtype=torch.float64))
    with use_backend("auto"):  # auto falls back instead
        swiglu(torch.randn(2, 8), torch.randn(2, 8, dtype=torch.float64))


# ------------------------------------------------------------------------------------------------ rms_norm
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(3, 176), (2, 3, 4096), (2, 6144), (1, 14336)])
def test_rms_norm(dtype, shape):
    torch.manual_seed(0)
    x = torch.randn(shape, dtype=dtype) * 3
    w = (1 + 0.1 * torch.randn(shape[-1])).to(dtype)
    _compare(rms_norm, (x, w), dtype, reduce_grads=(1,), eps=1e-6)


def test_rms_norm_fp32_weight_bf16_activations():
    torch.manual_seed(1)
    x, w = torch.randn(5, 176, dtype=torch.bfloat16), torch.randn(176)
    with use_backend("triton"):
        assert rms_norm(x, w, 1e-5).dtype == torch.float32
    _compare(rms_norm, (x, w), torch.bfloat16, reduce_grads=(1,), eps=1e-5)


def test_rms_norm_noncontiguous_rows():
    torch.manual_seed(2)
    x = torch.randn(4, 2, 300)[:, 1, :176]  # row stride 600, unit last stride
    w = torch.randn(176)
    _compare(rms_norm, (x, w), torch.float32, reduce_grads=(1,), eps=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(2, 3, 176), (3, 4096)])
def test_add_rms_norm(dtype, shape):
    torch.manual_seed(3)
    x, res = torch.randn(shape, dtype=dtype), torch.randn(shape, dtype=dtype) * 4
    w = torch.randn(shape[-1], dtype=dtype)
    _compare(add_rms_norm, (x, res, w), dtype, reduce_grads=(2,), eps=1e-6)


def test_add_rms_norm_fp32_residual_stream():
    torch.manual_seed(4)
    x, res = torch.randn(6, 176, dtype=torch.bfloat16), torch.randn(6, 176)
    w = torch.randn(176, dtype=torch.bfloat16)
    with use_backend("triton"):
        y, new_res = add_rms_norm(x, res, w, 1e-6)
    assert new_res.dtype == torch.bfloat16 and y.dtype == torch.bfloat16
    _compare(add_rms_norm, (x, res, w), torch.bfloat16, reduce_grads=(2,), eps=1e-6)


@pytest.mark.parametrize("used", ["y", "residual"])
def test_add_rms_norm_one_output_used(used):
    """The last layer uses only y; gradients must still match when the other output gets no gradient."""
    torch.manual_seed(5)
    inputs = (torch.randn(3, 176), torch.randn(3, 176), torch.randn(176))
    grads = {}
    for backend in ("eager", "triton"):
        leaves = _leaves(*inputs)
        with use_backend(backend):
            y, new_res = add_rms_norm(*leaves, 1e-6)
        (y if used == "y" else new_res).pow(2).sum().backward()
        grads[backend] = [t.grad if t.grad is not None else torch.zeros_like(t) for t in leaves]
    for a, e in zip(grads["triton"], grads["eager"]):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)


# -------------------------------------------------------------------------------------------------- swiglu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(2, 3, 176), (2, 14336), (1, 2, 1, 1030)])
def test_swiglu(dtype, shape):
    torch.manual_seed(6)
    gate, up = torch.randn(shape, dtype=dtype) * 4, torch.randn(shape, dtype=dtype)
    _compare(swiglu, (gate, up), dtype)


def test_swiglu_views_of_a_fused_projection():
    torch.manual_seed(7)
    gate_up = torch.randn(2, 5, 2 * 176)
    _compare(swiglu, (gate_up[..., :176], gate_up[..., 176:]), torch.float32)


# ------------------------------------------------------------------------------------------------- rotary
def _rope_cos_sin(bsz, seqlen, dim, offset=0):
    inv_freq = 1.0 / (10000 ** (torch.arange(0, dim, 2).float() / dim))
    pos = torch.arange(offset, offset + seqlen).float()
    emb = torch.cat([torch.outer(pos, inv_freq)] * 2, dim=-1)  # [T, D]
    return emb.cos().expand(bsz, seqlen, dim), emb.sin().expand(bsz, seqlen, dim)  # broadcast over batch


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dims", [(2, 5, 4, 2, 16), (1, 3, 32, 8, 128), (2, 2, 3, 1, 40)])
def test_rotary(dtype, dims):
    bsz, seqlen, hq, hkv, dim = dims
    torch.manual_seed(8)
    q, k = torch.randn(bsz, seqlen, hq, dim, dtype=dtype), torch.randn(bsz, seqlen, hkv, dim, dtype=dtype)
    cos, sin = _rope_cos_sin(bsz, seqlen, dim, offset=1000)  # fp32, cast to q.dtype inside
    _compare(apply_rotary, (q, k, cos, sin), dtype, n_grad=2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hkv", [1, 2])
def test_rotary_on_views_of_packed_wqkv(dtype, hkv):
    """InternLM2's wqkv output is grouped per KV head, [B, T, Hkv, groups + 2, D]: k (and q when Hkv == 1)
    are strided views of it, not copies."""
    bsz, seqlen, groups, dim = 2, 4, 3, 32
    torch.manual_seed(9)
    qkv = torch.randn(bsz, seqlen, hkv, groups + 2, dim, dtype=dtype)
    q = qkv[:, :, 0, :groups] if hkv == 1 else qkv[:, :, :, :groups].reshape(bsz, seqlen, hkv * groups, dim)
    k = qkv[:, :, :, groups]
    assert not k.is_contiguous() and (hkv != 1 or not q.is_contiguous())
    assert _leaves(k)[0].stride() == k.stride()  # the kernels see the strided view itself
    cos, sin = _rope_cos_sin(bsz, seqlen, dim)
    _compare(apply_rotary, (q, k, cos, sin), dtype, n_grad=2)


def test_rotary_on_head_major_views():
    """q/k transposed from [B, H, T, D] storage, cos/sin non-broadcast and fp32."""
    torch.manual_seed(10)
    q = torch.randn(2, 4, 6, 16).transpose(1, 2)  # [B, T, H, D] view
    k = torch.randn(2, 2, 6, 16).transpose(1, 2)
    cos, sin = (t.contiguous() for t in _rope_cos_sin(2, 6, 16))
    _compare(apply_rotary, (q, k, cos, sin), torch.float32, n_grad=2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_with_distinct_cos_sin_halves(dtype):
    """The kernel must not assume HF's duplicated halves (cos[:D/2] == cos[D/2:]): any cos/sin works."""
    torch.manual_seed(11)
    q, k = torch.randn(2, 3, 4, 24, dtype=dtype), torch.randn(2, 3, 2, 24, dtype=dtype)
    cos, sin = torch.randn(2, 3, 24), torch.randn(2, 3, 24)
    _compare(apply_rotary, (q, k, cos, sin), dtype, n_grad=2)


# ------------------------------------------------------------------------------------- fused linear CE
def _ce_inputs(n, hidden, vocab, dtype, ignore_index=-100, seed=10):
    torch.manual_seed(seed)
    h = torch.randn(n, hidden, dtype=dtype)
    w = (torch.randn(vocab, hidden) / hidden**0.5).to(dtype)
    labels = torch.randint(0, vocab, (n,))
    labels[::5] = ignore_index
    labels[1] = vocab - 1  # last column: the online softmax's last, partial block
    return h, w, labels


def _ce_check(backend, h, w, labels, reduction, chunk_size, ignore_index=-100, dtype=torch.float32):
    """Fused loss and grads (under ``backend``) against the full-logits reference."""
    kw = dict(ignore_index=ignore_index, reduction=reduction)
    hr, wr = _leaves(h, w)
    ref = reference.linear_cross_entropy(hr, wr, labels, **kw)
    g = torch.randn(ref.shape) if reduction == "none" else torch.tensor(1.7)
    ref.backward(g)
    hf, wf = _leaves(h, w)
    with use_backend(backend):
        loss = fused_linear_cross_entropy(hf, wf, labels, chunk_size=chunk_size, **kw)
    loss.backward(g)
    assert loss.dtype == torch.float32 and loss.shape == ref.shape
    _assert_close(loss, ref.detach(), dtype, "loss")
    _assert_close(hf.grad, hr.grad, dtype, "d hidden", scale_atol=True)
    _assert_close(wf.grad, wr.grad, dtype, "d weight", scale_atol=True)


@pytest.mark.parametrize("backend", ["eager", "triton"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_linear_cross_entropy(backend, reduction, dtype, monkeypatch):
    # V = 5000 > the kernel's 4096-wide block: two online-softmax blocks, the second partial.
    h, w, labels = _ce_inputs(37, 48, 5000, dtype)
    # Half-precision weight grads are accumulated over V slices of _CHUNK_ELEMENTS / H rows: make that
    # 1024 rows so the slicing (5 slices, the last partial) runs here too.
    monkeypatch.setattr(fused_cross_entropy, "_CHUNK_ELEMENTS", 48 * 1024)
    _ce_check(backend, h, w, labels, reduction, chunk_size=8, dtype=dtype)  # 8 does not divide 37


@pytest.mark.parametrize("backend", ["eager", "triton"])
def test_fused_ce_custom_ignore_index_and_batched_shape(backend):
    h, w, labels = _ce_inputs(12, 32, 300, torch.float32, ignore_index=-1)
    _ce_check(backend, h, w, labels, "mean", chunk_size=5, ignore_index=-1)
    with use_backend(backend):
        per_token = fused_linear_cross_entropy(h.view(3, 4, 32), w, labels.view(3, 4), -1, "none", 5)
    assert per_token.shape == (3, 4)
    torch.testing.assert_close(per_token.view(-1), reference.linear_cross_entropy(h, w, labels, -1, "none"))
    assert (per_token.view(-1)[labels == -1] == 0).all()


@pytest.mark.parametrize("backend", ["eager", "triton"])
def test_fused_ce_all_ignored_gives_zero_not_nan(backend):
    h, w, _ = _ce_inputs(6, 16, 100, torch.float32)
    labels = torch.full((6,), -100)
    hf, wf = _leaves(h, w)
    with use_backend(backend):
        loss = fused_linear_cross_entropy(hf, wf, labels, chunk_size=4)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.equal(hf.grad, torch.zeros_like(h)) and torch.equal(wf.grad, torch.zeros_like(w))


@pytest.mark.parametrize("backend", ["eager", "triton"])
def test_fused_ce_partial_grads_and_no_grad(backend):
    h, w, labels = _ce_inputs(10, 16, 200, torch.float32)
    ref = reference.linear_cross_entropy(h, w, labels)
    with use_backend(backend):
        with torch.no_grad():
            torch.testing.assert_close(fused_linear_cross_entropy(h, w, labels, chunk_size=3), ref)
        wf = w.clone().requires_grad_()  # frozen hidden, trainable head
        fused_linear_cross_entropy(h, wf, labels, chunk_size=3).backward()
        hf = h.clone().requires_grad_()  # frozen head (e.g. LoRA)
        fused_linear_cross_entropy(hf, w, labels, reduction="none", chunk_size=3).sum().backward()
    wr, hr = w.clone().requires_grad_(), h.clone().requires_grad_()
    reference.linear_cross_entropy(h, wr, labels).backward()
    reference.linear_cross_entropy(hr, w, labels, reduction="none").sum().backward()
    torch.testing.assert_close(wf.grad, wr.grad)
    torch.testing.assert_close(hf.grad, hr.grad)


def test_fused_ce_second_backward_through_precomputed_grads_raises():
    h, w, labels = _ce_inputs(4, 8, 50, torch.float32)
    hf = h.clone().requires_grad_()
    loss = fused_linear_cross_entropy(hf, w, labels)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="twice"):
        loss.backward()


@pytest.mark.parametrize("backend", ["eager", "triton"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_fused_ce_never_materialises_full_logits(backend, reduction):
    n, hidden, vocab, chunk = 64, 24, 1000, 16
    h, w, labels = _ce_inputs(n, hidden, vocab, torch.float32)
    # Largest legitimate tensor: a [chunk, V] fp32 logits chunk or a [V, H] fp32 weight gradient.
    bound = max(chunk, hidden) * vocab * 4
    assert bound < n * vocab * 4 // 2
    hf, wf = _leaves(h, w)
    with use_backend(backend), OpRecorder() as rec:
        loss = fused_linear_cross_entropy(hf, wf, labels, reduction=reduction, chunk_size=chunk)
        loss.sum().backward()
    assert (chunk, vocab) in [shape for _, shape, _ in rec.calls], "the recorder saw no logits chunk"
    too_big = [(op, shape) for op, shape, nbytes in rec.calls if nbytes > bound]
    assert not too_big, f"tensors larger than one chunk of logits: {too_big}"
    # The same recorder does catch a full-logits implementation:
    with OpRecorder() as rec_ref:
        reference.linear_cross_entropy(*_leaves(h, w), labels).backward()
    assert any(nbytes >= n * vocab * 4 for _, _, nbytes in rec_ref.calls)


# ------------------------------------------------------------------------------- compiled-mode check
# The interpreter is lenient about types (loop-carried scalars, int widths, constexpr branches) where the
# compiler is not. Compiling each kernel variant to an sm_90 cubin needs only the ptxas Triton ships, no
# GPU, and runs in a subprocess because this process has TRITON_INTERPRET=1.
_AOT_SCRIPT = r"""
import itertools
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from internlm2.core.kernels import triton_cross_entropy as ce, triton_rmsnorm as rn
from internlm2.core.kernels import triton_rotary as ro, triton_swiglu as sw

def compile_(fn, sig, consts, num_warps=4):
    sig = {**sig, **{k: "constexpr" for k in consts}}
    kernel = triton.compile(ASTSource(fn, sig, consts), target=GPUTarget("cuda", 90, 32),
                            options={"num_warps": num_warps})
    assert kernel.asm["cubin"]

i32 = lambda *names: {n: "i32" for n in names}
for dt, wdt in [("bf16", "bf16"), ("fp16", "fp16"), ("bf16", "fp32")]:
    ydt = "fp32" if wdt == "fp32" else dt
    for has_res in (False, True):
        compile_(rn._rmsnorm_fwd_kernel, dict(X=f"*{dt}", RES=f"*{dt}", W=f"*{wdt}", Y=f"*{ydt}",
                 RES_OUT=f"*{dt}", RSTD="*fp32", **i32("stride_x", "stride_res", "stride_y", "stride_res_out",
                 "N"), eps="fp32"), dict(HAS_RESIDUAL=has_res, BLOCK=4096), 8)
    for has_dy, has_dres in [(True, False), (True, True), (False, True)]:
        compile_(rn._rmsnorm_bwd_kernel, dict(DY=f"*{ydt}", S=f"*{dt}", W=f"*{wdt}", RSTD="*fp32",
                 DRES_OUT=f"*{dt}", DS=f"*{dt}", DW_PARTIAL="*fp32", **i32("stride_dy", "stride_s",
                 "stride_dres_out", "stride_ds", "M", "N", "rows_per_program")),
                 dict(HAS_DY=has_dy, HAS_DRES_OUT=has_dres, COMPUTE_DW=has_dy, BLOCK=16384), 16)
for dt in ("bf16", "fp32"):
    compile_(sw._swiglu_fwd_kernel, dict(G=f"*{dt}", U=f"*{dt}", Y=f"*{dt}",
             **i32("stride_g", "stride_u", "stride_y", "N")), dict(BLOCK=1024))
    compile_(sw._swiglu_bwd_kernel, dict(DY=f"*{dt}", G=f"*{dt}", U=f"*{dt}", DG=f"*{dt}", DU=f"*{dt}",
             **i32("stride_dy", "stride_g", "stride_u", "stride_dg", "stride_du", "N")), dict(BLOCK=1024))
    for backward in (False, True):
        compile_(ro._rotary_kernel, dict(Q=f"*{dt}", K=f"*{dt}", COS="*fp32", SIN="*fp32", QO=f"*{dt}",
                 KO=f"*{dt}", **i32(*"sqb sqt sqh skb skt skh sqob sqot sqoh skob skot skoh scb sct ssb sst "
                 "T HQ HKV HALF".split())), dict(BACKWARD=backward, BLOCK_HQ=32, BLOCK_HKV=8, BLOCK_HALF=64))
    for lse, grad in [(True, False), (True, True), (False, True)]:
        compile_(ce._ce_chunk_kernel, dict(LOGITS=f"*{dt}", LABELS="*i64", LSE="*fp32", LOSS="*fp32",
                 SCALE="*fp32", **i32("stride_row", "V", "ignore_index")),
                 dict(COMPUTE_LSE=lse, WRITE_GRAD=grad, BLOCK_V=4096), 8)
print("compiled all")
"""


def test_triton_kernels_compile_for_sm90(tmp_path):
    import pathlib
    import subprocess
    import sys

    import triton

    ptxas = pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    if not ptxas.exists():
        pytest.skip(f"this Triton install ships no ptxas at {ptxas}; cannot compile without a CUDA toolkit")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(tmp_path), TRITON_DEFAULT_FP_FUSION="1")
    proc = subprocess.run([sys.executable, "-c", _AOT_SCRIPT], env=env, capture_output=True, text=True, timeout=100)
    assert proc.returncode == 0 and "compiled all" in proc.stdout, proc.stderr[-4000:]


# ------------------------------------------------------------------------------------------ on a GPU
# Compiled kernels on CUDA at InternLM2-7B widths. A subprocess again: here the kernels are interpreted.
_CUDA_SCRIPT = r"""
import torch
from internlm2.core import kernels
from internlm2.core.kernels import reference

def check(name, fn, inputs, n_grad, tol):
    outs = {}
    for backend in ("eager", "triton"):
        leaves = [t.detach().clone().requires_grad_() for t in inputs[:n_grad]]
        with kernels.use_backend(backend):
            out = fn(*leaves, *inputs[n_grad:])
        out = out if isinstance(out, tuple) else (out,)
        torch.manual_seed(1)
        torch.autograd.backward(list(out), [torch.randn_like(o) for o in out])
        outs[backend] = [o.detach().float() for o in out] + [t.grad.float() for t in leaves]
    for i, (a, e) in enumerate(zip(outs["triton"], outs["eager"])):
        err = ((a - e).norm() / e.norm().clamp(min=1e-12)).item()
        assert err < tol, f"{name} tensor {i}: relative error {err:.2e}"
    print(name, "ok")

torch.manual_seed(0)
dev, bf = "cuda", torch.bfloat16
x, r = torch.randn(2, 512, 4096, device=dev, dtype=bf), torch.randn(2, 512, 4096, device=dev, dtype=bf)
w = torch.randn(4096, device=dev, dtype=bf)
check("rms_norm", lambda a, b: kernels.rms_norm(a, b, 1e-5), (x, w), 2, 1e-2)
check("add_rms_norm", lambda a, b, c: kernels.add_rms_norm(a, b, c, 1e-5), (x, r, w), 3, 1e-2)
g, u = torch.randn(1024, 14336, device=dev, dtype=bf), torch.randn(1024, 14336, device=dev, dtype=bf)
check("swiglu", kernels.swiglu, (g, u), 2, 1e-2)
qkv = torch.randn(2, 256, 8, 6, 128, device=dev, dtype=bf)
q, k = qkv[..., :4, :].reshape(2, 256, 32, 128), qkv[..., 4, :]
pos = torch.arange(256, device=dev).float()
emb = torch.cat([torch.outer(pos, 1e6 ** (-torch.arange(0, 128, 2, device=dev).float() / 128))] * 2, -1)
check("apply_rotary", kernels.apply_rotary, (q, k, emb.cos()[None].to(bf), emb.sin()[None].to(bf)), 2, 1e-2)
h = torch.randn(1000, 4096, device=dev, dtype=bf)
wl = (torch.randn(92544, 4096, device=dev) / 64).to(bf)
labels = torch.randint(0, 92544, (1000,), device=dev)
labels[::3] = -100
for red in ("mean", "none"):
    check(f"fused_ce[{red}]", lambda a, b: kernels.fused_linear_cross_entropy(a, b, labels, reduction=red,
          chunk_size=384), (h, wl), 2, 2e-2)
print("cuda all ok")
"""


def test_cuda_kernels_match_eager():
    import subprocess
    import sys

    if not torch.cuda.is_available():
        pytest.skip("no CUDA device: the compiled kernels are checked by test_triton_kernels_compile_for_sm90")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _CUDA_SCRIPT], env=env, capture_output=True, text=True, timeout=50)
    assert proc.returncode == 0 and "cuda all ok" in proc.stdout, proc.stdout + proc.stderr[-4000:]
