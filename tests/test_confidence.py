"""fastseg::calibration_stats and fastseg.confidence against an independent float64 NumPy brute force.

The brute force bins by comparing each probability with the bin edges (not by flooring p * K as the kernels
and the reference do), takes the argmax with numpy, and counts every statistic with boolean masks. A test of
values on and next to the edges checks the binning against exact rational arithmetic. CUDA tests compare the
CUDA kernel with the CPU kernel and skip without a GPU.
"""
import math
import os
from fractions import Fraction

import numpy as np
import pytest
import torch
import torch.distributed as dist

import fastseg
from fastseg import _extension, _reference
from fastseg.confidence import (
    CalibrationStats,
    ConfidenceAnalysis,
    calibration_stats,
    expected_calibration_error,
    maximum_calibration_error,
)
from gloo import run_on_ranks

needs_ext = pytest.mark.skipif(not _extension.available(), reason="compiled extension not loaded")
needs_cuda = pytest.mark.skipif(
    not (torch.cuda.is_available() and _extension.cuda_available()), reason="needs a CUDA device and kernels"
)


def OP(*args):
    """The op itself (looked up at call time: it is absent without the extension)."""
    return torch.ops.fastseg.calibration_stats(*args)


# ------------------------------------------------------------------------------------------ inputs, oracle


def make_probs(B, C, spatial, dtype=torch.float32, seed=0, layout="contiguous", num_bins=15, device="cpu"):
    """Softmax of random logits with forced special voxels: one-hot (exact 0 and 1), all classes tied,
    two classes tied at 0.5, and class-0 values on and next to the bin edges; cast to dtype and laid out."""
    gen = torch.Generator().manual_seed(seed)
    M = math.prod((B, *spatial))
    flat = torch.softmax(3 * torch.randn((M, C), generator=gen, dtype=torch.float64), dim=1)
    kind = torch.randint(0, 8, (M,), generator=gen)
    hot = torch.randint(0, C, (M,), generator=gen)
    onehot = torch.nn.functional.one_hot(hot, C).to(torch.float64)
    flat[kind == 0] = onehot[kind == 0]
    flat[kind == 1] = 1.0 / C
    if C >= 2:
        pair = torch.zeros(M, C, dtype=torch.float64)
        j = (hot + 1 + torch.randint(0, C - 1, (M,), generator=gen)) % C
        pair[torch.arange(M), hot] = 0.5
        pair[torch.arange(M), j] = 0.5
        flat[kind == 2] = pair[kind == 2]
    edges = torch.randint(0, num_bins + 1, (M,), generator=gen).to(torch.float64) / num_bins
    nudge = torch.randint(-1, 2, (M,), generator=gen).to(torch.float64) * 1e-7
    flat[kind == 3, 0] = (edges + nudge).clamp(0, 1)[kind == 3]
    p = flat.reshape(B, *spatial, C).movedim(-1, 1)
    p = p.to(dtype).to(device)
    if layout == "channels_last":
        fmt = torch.channels_last if p.dim() == 4 else torch.channels_last_3d
        p = p.contiguous(memory_format=fmt)
    elif layout == "strided":  # every other voxel along the first spatial axis of a larger tensor
        big = torch.zeros((B, C, 2 * spatial[0], *spatial[1:]), dtype=dtype, device=device)
        big[:, :, ::2] = p
        p = big[:, :, ::2]
    elif layout == "permuted":  # spatial axes that do not collapse into one stride (the op copies)
        p = p.transpose(2, -1).contiguous().transpose(2, -1)
    return p


def make_target(B, C, spatial, ignore_index=None, dtype=torch.int64, seed=0):
    gen = torch.Generator().manual_seed(seed + 1000)
    t = torch.randint(0, C, (B, *spatial), generator=gen)
    if ignore_index is not None:
        t[torch.rand(t.shape, generator=gen) < 0.2] = ignore_index
    return t.to(dtype)


def brute_force(probs, target, num_bins, ignore_index=None):
    """float64 NumPy oracle: edge comparisons for the bins, numpy argmax, boolean masks for every sum."""
    p = probs.detach().to(torch.float64).cpu().numpy()
    C = p.shape[1]
    p = np.moveaxis(p, 1, -1).reshape(-1, C)
    p = np.clip(np.nan_to_num(p, nan=0.0, posinf=1.0, neginf=0.0), 0.0, 1.0)
    y = target.cpu().numpy().reshape(-1).astype(np.int64)
    keep = np.ones_like(y, dtype=bool) if ignore_index is None else y != ignore_index
    p, y = p[keep], y[keep]
    lo = np.arange(num_bins) / num_bins
    hi = np.arange(1, num_bins + 1) / num_bins

    def in_bin(v, k):
        return (v >= lo[k]) & ((v < hi[k]) if k < num_bins - 1 else (v <= 1.0))

    cls = np.zeros((C, num_bins, 3))
    for c in range(C):
        for k in range(num_bins):
            sel = in_bin(p[:, c], k)
            cls[c, k] = [sel.sum(), p[sel, c].sum(), (y[sel] == c).sum()]
    pred = np.argmax(p, axis=1)
    confidence = p[np.arange(len(y)), pred]
    top = np.zeros((num_bins, 3))
    for k in range(num_bins):
        sel = in_bin(confidence, k)
        top[k] = [sel.sum(), confidence[sel].sum(), (pred[sel] == y[sel]).sum()]
    conf = np.zeros((C, 6))
    for c in range(C):
        tp, fp, fn = (pred == c) & (y == c), (pred == c) & (y != c), (y == c) & (pred != c)
        conf[c] = [tp.sum(), p[tp, c].sum(), fp.sum(), p[fp, c].sum(), fn.sum(), p[fn, c].sum()]
    return cls, top, conf


COUNT_COLS = {0: [0], 1: [0], 2: [0, 2, 4]}  # per output: the columns holding counts (exact)


def assert_matches(got, want, rtol=1e-12, atol=1e-12):
    """Counts (and hit counts) exactly, sums to float64 round-off."""
    assert len(got) == 3
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.dtype == torch.float64 and tuple(g.shape) == w.shape
        g = g.cpu().numpy()
        np.testing.assert_allclose(g, w, rtol=rtol, atol=atol)
        cols = COUNT_COLS[i] + ([2] if i < 2 else [])
        np.testing.assert_array_equal(g[..., cols], w[..., cols])


# ------------------------------------------------------------------------------------------------ the op

SPATIAL = {2: (9, 7), 3: (5, 6, 7)}
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
LAYOUTS = ("contiguous", "channels_last", "strided", "permuted")


@needs_ext
@pytest.mark.parametrize("nd", (2, 3))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("ignore_index", (None, 255))
def test_op_matches_brute_force(nd, dtype, layout, ignore_index):
    B, C, K = 2, 5, 15
    p = make_probs(B, C, SPATIAL[nd], dtype, seed=nd, layout=layout)
    t = make_target(B, C, SPATIAL[nd], ignore_index, seed=nd)
    assert_matches(OP(p, t, K, ignore_index), brute_force(p, t, K, ignore_index))


@needs_ext
@pytest.mark.parametrize("C,K", [(1, 1), (2, 1), (3, 2), (4, 10), (7, 20), (40, 15)])
@pytest.mark.parametrize("label_dtype", (torch.uint8, torch.int16, torch.int32, torch.int64), ids=str)
def test_op_classes_bins_and_label_dtypes(C, K, label_dtype):
    # tiles of the CPU kernel hold 8192 / C voxels: N = 1000 crosses tile and sample boundaries
    p = make_probs(3, C, (10, 10, 10), seed=C, num_bins=K)
    t = make_target(3, C, (10, 10, 10), ignore_index=200, dtype=label_dtype, seed=C)
    assert_matches(OP(p, t, K, 200), brute_force(p, t, K, 200))


@needs_ext
def test_op_in_range_ignore_index_bool_labels_and_no_spatial_dims():
    p = make_probs(2, 3, (6, 5), seed=4)
    t = make_target(2, 3, (6, 5), seed=4)
    assert_matches(OP(p, t, 15, 0), brute_force(p, t, 15, 0))  # ignoring a real class
    t2 = t.clamp(max=1)
    p2 = make_probs(2, 2, (6, 5), seed=5)
    assert_matches(OP(p2, t2.bool(), 15, None), brute_force(p2, t2, 15))
    p3, t3 = make_probs(7, 3, (), seed=6), torch.tensor([0, 1, 2, 2, 1, 0, 1])  # (B, C): no spatial dims
    assert_matches(OP(p3, t3, 4, None), brute_force(p3, t3, 4))


@needs_ext
def test_op_clamps_out_of_range_and_nan():
    p = torch.tensor([[[1.5, -0.2, float("nan"), 0.3, float("inf")],
                       [0.2, float("nan"), 0.1, -float("inf"), 0.5]]])  # (1, 2, 5)
    t = torch.tensor([[0, 1, 0, 1, 1]])
    assert_matches(OP(p, t, 4, None), brute_force(p, t, 4))


@needs_ext
@pytest.mark.parametrize("K", (3, 7, 10, 15, 100))
def test_bins_are_exact_at_the_edges(K):
    # float32 values nearest to each edge k / K and their neighbours, binned by exact rational arithmetic
    vals = []
    for k in range(K + 1):
        e = np.float32(k / K)
        vals += [np.nextafter(e, np.float32(-1)), e, np.nextafter(e, np.float32(2))]
    v = np.clip(np.array(vals, dtype=np.float32), 0, 1)
    want = np.zeros(K)
    for x in v:
        want[min(math.floor(Fraction(float(x)) * K), K - 1)] += 1
    got = OP(torch.from_numpy(v).view(1, 1, -1), torch.zeros(1, v.size, dtype=torch.long), K, None)
    np.testing.assert_array_equal(got[0][0, :, 0].numpy(), want)
    np.testing.assert_array_equal(got[1][:, 0].numpy(), want)
    ref = _reference.calibration_stats(torch.from_numpy(v).view(1, 1, -1), torch.zeros(1, v.size, dtype=torch.long),
                                       K, None)
    np.testing.assert_array_equal(ref[0][0, :, 0].numpy(), want)


@needs_ext
def test_op_is_deterministic_and_independent_of_threads():
    p = make_probs(2, 6, (20, 20, 10), seed=8)
    t = make_target(2, 6, (20, 20, 10), 255, seed=8)
    a = OP(p, t, 15, 255)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        b = OP(p, t, 15, 255)
    finally:
        torch.set_num_threads(threads)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-13, atol=1e-12)
    for x, y in zip(a, OP(p, t, 15, 255)):
        assert torch.equal(x, y)


@needs_ext
def test_empty_inputs_give_zeros():
    for shape in ((0, 3, 4, 4), (2, 3, 0, 4)):
        p = torch.rand(shape)
        t = torch.zeros((shape[0], *shape[2:]), dtype=torch.long)
        cls, top, conf = OP(p, t, 5, None)
        assert cls.shape == (3, 5, 3) and top.shape == (5, 3) and conf.shape == (3, 6)
        assert not cls.any() and not top.any() and not conf.any()


@pytest.mark.parametrize("nd", (2, 3))
@pytest.mark.parametrize("dtype", (torch.float32, torch.float16, torch.float64), ids=str)
@pytest.mark.parametrize("ignore_index", (None, 255))
def test_reference_matches_brute_force(nd, dtype, ignore_index):
    p = make_probs(2, 4, SPATIAL[nd], dtype, seed=10 + nd, layout="channels_last")
    t = make_target(2, 4, SPATIAL[nd], ignore_index, seed=10 + nd)
    assert_matches(_reference.calibration_stats(p, t, 15, ignore_index), brute_force(p, t, 15, ignore_index))


def test_falls_back_to_reference_without_extension(monkeypatch):
    p, t = make_probs(2, 3, (6, 7), seed=12), make_target(2, 3, (6, 7), 255, seed=12)
    monkeypatch.setattr(_extension, "available", lambda: False)
    assert_matches(calibration_stats(p, t, 10, 255), brute_force(p, t, 10, 255))
    with pytest.raises(ValueError, match="got label 7"):
        calibration_stats(p, torch.full_like(t, 7), 10)


# --------------------------------------------------------------------------------------- op registration


@needs_ext
@pytest.mark.parametrize("requires_grad", (False, True))
def test_opcheck(requires_grad):
    p = make_probs(2, 3, (4, 5), seed=13).requires_grad_(requires_grad)
    t = make_target(2, 3, (4, 5), 255, seed=13)
    op = torch.ops.fastseg.calibration_stats.default
    torch.library.opcheck(op, (p, t, 7, 255))
    torch.library.opcheck(op, (p.detach().half(), t.clamp(max=2).int(), 3, None))


@needs_ext
def test_outputs_never_require_grad():
    p = make_probs(1, 3, (4, 4), seed=14).requires_grad_()
    t = make_target(1, 3, (4, 4), seed=14)
    assert not any(o.requires_grad for o in OP(p, t, 5, None))
    assert not any(o.requires_grad for o in calibration_stats(p, t))


@needs_ext
def test_torch_compile_fullgraph():
    p = make_probs(2, 4, (6, 5, 4), seed=15)
    t = make_target(2, 4, (6, 5, 4), 255, seed=15)
    compiled = torch.compile(lambda x, y: calibration_stats(x, y, num_bins=10, ignore_index=255), fullgraph=True,
                             backend="aot_eager")
    got = compiled(p, t)
    assert isinstance(got, tuple) and len(got) == 3
    for g, w in zip(got, calibration_stats(p, t, 10, 255)):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("probs,target,kwargs,match", [
    (torch.rand(5), torch.zeros(5, dtype=torch.long), {}, r"probs must be a \(B, C, \*spatial\)"),
    (torch.rand(2, 3, 4).int(), torch.zeros(2, 4, dtype=torch.long), {}, "probs must be float16"),
    (torch.rand(2, 3, 4, 5), torch.zeros(2, 4, 6, dtype=torch.long), {},
     r"target must be labels of shape .*\(2, 4, 5\)"),
    (torch.rand(2, 3, 4, 5), torch.zeros(2, 4, dtype=torch.long), {}, "target must be labels of shape"),
    (torch.rand(2, 3, 4), torch.zeros(2, 4), {}, "target must be integer class labels"),
    (torch.rand(2, 3, 4), torch.zeros(2, 4, dtype=torch.long), {"num_bins": 0}, r"num_bins must be an integer in \[1"),
    (torch.rand(2, 3, 4), torch.zeros(2, 4, dtype=torch.long), {"num_bins": 2.5}, "num_bins must be"),
    (torch.rand(2, 3, 4), torch.zeros(2, 4, dtype=torch.long), {"ignore_index": 1.5}, "ignore_index must be"),
    (torch.rand(2, 3, 4), torch.full((2, 4), 3), {}, r"class labels in \[0, 3\), got label 3"),
    (torch.rand(2, 3, 4), torch.full((2, 4), -1), {"ignore_index": 255}, r"or ignore_index=255, got label -1"),
    ("probs", torch.zeros(2, 4, dtype=torch.long), {}, "probs must be a torch.Tensor"),
])
def test_calibration_stats_errors(probs, target, kwargs, match):
    with pytest.raises(ValueError, match=match):
        calibration_stats(probs, target, **kwargs)


def test_target_with_channel_dim_and_wide_unsigned_labels():
    p, t = make_probs(2, 3, (4, 5), seed=16), make_target(2, 3, (4, 5), seed=16)
    want = brute_force(p, t, 15)
    assert_matches(calibration_stats(p, t.unsqueeze(1)), want)
    assert_matches(calibration_stats(p, t.to(torch.uint16)), want)


@needs_ext
def test_op_errors_from_cpp():
    p, t = torch.rand(2, 3, 4), torch.zeros(2, 4, dtype=torch.long)
    with pytest.raises(ValueError, match=r"fastseg::calibration_stats: probs must be \(B, C, \*spatial\)"):
        OP(torch.rand(5), torch.zeros(5, dtype=torch.long), 5, None)
    with pytest.raises(ValueError, match=r"target must be \(B, \*spatial\) = \[2, 4\]"):
        OP(p, torch.zeros(2, 5, dtype=torch.long), 5, None)
    with pytest.raises(ValueError, match=r"num_bins must be in \[1, 16777216\], got 0"):
        OP(p, t, 0, None)
    with pytest.raises(TypeError, match="target must hold integer class labels"):
        OP(p, t.float(), 5, None)
    with pytest.raises(TypeError, match="probs must be float16, bfloat16, float32 or float64"):
        OP(p.int(), t, 5, None)
    with pytest.raises(ValueError, match=r"class labels in \[0, 3\) or ignore_index=9, got label 4"):
        OP(p, torch.full((2, 4), 4), 5, 9)


# ------------------------------------------------------------------------------------ derived metrics


def tiny_case():
    """Six voxels, three classes, two bins; the last voxel is ignored. Hand-computed values below."""
    p = torch.tensor([[0.8, 0.1, 0.1],
                      [0.5, 0.5, 0.0],   # tie: argmax 0
                      [0.1, 0.3, 0.6],
                      [0.2, 0.6, 0.2],
                      [0.0, 0.0, 1.0],
                      [0.3, 0.3, 0.4]], dtype=torch.float64).T.reshape(1, 3, 6)
    t = torch.tensor([[0, 1, 1, 1, 2, 255]])
    return p, t


def test_ece_and_mce_by_hand():
    p, t = tiny_case()
    cls, top, conf = calibration_stats(p, t, num_bins=2, ignore_index=255)
    # class 0: bin [0, .5) holds p = .1, .2, 0 (no hit): |0 - .3| = .3; bin [.5, 1] holds .8 (hit), .5: |1 - 1.3| = .3
    # class 1: bin 0: .1, .3 (hit), 0: |1 - .4| = .6; bin 1: .5 (hit), .6 (hit): |2 - 1.1| = .9
    # class 2: bin 0: .1, 0, .2: |0 - .3| = .3; bin 1: .6, 1 (hit): |1 - 1.6| = .6
    torch.testing.assert_close(expected_calibration_error(cls), torch.tensor([0.6, 1.5, 0.9], dtype=torch.float64) / 5)
    torch.testing.assert_close(maximum_calibration_error(cls), torch.tensor([0.15, 0.45, 0.3], dtype=torch.float64))
    # top label: every confidence (.8, .5, .6, .6, 1) in bin 1, 3 correct: |3 - 3.5| / 5
    torch.testing.assert_close(float(expected_calibration_error(top)), 0.1)
    torch.testing.assert_close(float(maximum_calibration_error(top)), 0.1)
    want_conf = torch.tensor([[1, 0.8, 1, 0.5, 0, 0],     # TP voxel 0; FP voxel 1 (the tie)
                              [1, 0.6, 0, 0, 2, 0.8],     # TP voxel 3; FN voxels 1 and 2
                              [1, 1.0, 1, 0.6, 0, 0]],    # TP voxel 4; FP voxel 2
                             dtype=torch.float64)
    torch.testing.assert_close(conf, want_conf)


def test_analysis_summary_by_hand():
    p, t = tiny_case()
    a = ConfidenceAnalysis(3, num_bins=2, ignore_index=255, class_names=["bg", "a", "b"], size_thresholds=(2, 3),
                           include_background=True)
    a.update(p, t)
    r = a.compute()
    torch.testing.assert_close(r["ece"], torch.tensor([0.12, 0.3, 0.18], dtype=torch.float64))
    torch.testing.assert_close(r["tp_confidence"], torch.tensor([0.8, 0.6, 1.0], dtype=torch.float64))
    torch.testing.assert_close(r["fp_confidence"], torch.tensor([0.5, math.nan, 0.6], dtype=torch.float64),
                               equal_nan=True)
    torch.testing.assert_close(r["fn_confidence"], torch.tensor([math.nan, 0.4, math.nan], dtype=torch.float64),
                               equal_nan=True)
    torch.testing.assert_close(r["gt_voxels"], torch.tensor([1.0, 3.0, 1.0], dtype=torch.float64))
    assert r["size_group"] == ["small", "large", "small"]
    assert r["groups"]["small"]["classes"] == [0, 2] and r["groups"]["medium"]["classes"] == []
    assert math.isclose(r["groups"]["small"]["ece"], 0.15) and math.isnan(r["groups"]["medium"]["ece"])
    assert math.isclose(r["groups"]["small"]["fp_confidence"], 0.55)
    assert math.isclose(r["top_label_ece"], 0.1) and math.isclose(r["classwise_ece"], 0.2)
    # the small group's pooled bins: classes 0 and 2
    small = r["groups"]["small"]["reliability"]
    torch.testing.assert_close(small["count"], torch.tensor([6.0, 4.0], dtype=torch.float64))
    torch.testing.assert_close(small["accuracy"], torch.tensor([0.0, 0.5], dtype=torch.float64))
    rel = r["top_label_reliability"]
    assert rel["count"].tolist() == [0.0, 5.0] and math.isnan(rel["confidence"][0])
    assert math.isclose(rel["confidence"][1], 0.7) and math.isclose(rel["accuracy"][1], 0.6)
    table = a.table(r)
    assert "| a | large | 3 | 0.3000 | 0.4500 | 0.6000 | – | 0.4000 | 1 | 0 | 2 |" in table
    assert "**small** (mean of 2)" in table and "top-label ECE: 0.1000" in table


def brute_ece(bins):
    n, s, h = bins[..., 0], bins[..., 1], bins[..., 2]
    with np.errstate(invalid="ignore", divide="ignore"):
        gap = np.where(n > 0, np.abs(h / n - s / n), np.nan)
        ece = np.nansum(n * np.nan_to_num(gap), axis=-1) / n.sum(-1)
        mce = np.nanmax(gap, axis=-1)
    return ece, mce


def test_analysis_accumulates_batches_and_groups_by_size():
    C, K = 4, 10
    p = make_probs(4, C, (10, 12, 9), seed=20, num_bins=K)
    t = make_target(4, C, (10, 12, 9), ignore_index=255, seed=20)
    # class 3 is tiny and appears in cases 0 and 2 only; class 2 is absent everywhere
    t[t == 3] = 1
    t[t == 2] = 0
    t[0, :2, :2, :2] = 3
    t[2, :3, :3, :1] = 3
    a = ConfidenceAnalysis(C, num_bins=K, ignore_index=255, size_thresholds=(100, 1000))
    a.update(p[:1], t[:1])
    a.update(p[1:], t[1:])
    r = a.compute()
    cls, top, conf = brute_force(p, t, K, 255)
    ece, mce = brute_ece(cls)
    np.testing.assert_allclose(r["ece"].numpy(), ece, rtol=1e-12)
    np.testing.assert_allclose(r["mce"].numpy(), mce, rtol=1e-12)
    tece, tmce = brute_ece(top)
    assert math.isclose(r["top_label_ece"], tece, rel_tol=1e-12)
    assert math.isclose(r["top_label_mce"], tmce, rel_tol=1e-12)
    np.testing.assert_allclose(r["reliability"]["count"].numpy(), cls[..., 0])
    np.testing.assert_allclose(r["tp"].numpy(), conf[:, 0])
    labels = t.numpy()
    sizes = [[(labels[b] == c).sum() for b in range(4)] for c in range(C)]
    want_gt = [np.mean([s for s in row if s > 0]) if any(row) else np.nan for row in sizes]
    np.testing.assert_allclose(r["gt_voxels"].numpy(), want_gt)
    assert r["cases_present"].tolist() == [4, 4, 0, 2] and r["cases"] == 4
    assert r["size_group"] == [None, "medium", None, "small"]  # background excluded, class 2 absent
    assert r["groups"]["small"]["classes"] == [3] and r["groups"]["large"]["classes"] == []
    assert math.isclose(r["classwise_ece"], np.nanmean(ece[1:]), rel_tol=1e-12)
    a.reset()
    assert a.compute()["cases"] == 0


def test_analysis_plot_is_a_png_written_atomically(tmp_path):
    p, t = make_probs(2, 3, (8, 8, 4), seed=21), make_target(2, 3, (8, 8, 4), seed=21)
    a = ConfidenceAnalysis(3, class_names=["background", "parotid", "lens"], size_thresholds=(50, 150))
    a.update(p, t)
    out = a.plot(tmp_path / "sub" / "confidence.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(os.listdir(tmp_path / "sub")) == ["confidence.png"]
    assert "background" in a.table() and "ConfidenceAnalysis(num_classes=3" in repr(a)


def test_analysis_plot_leaves_nothing_on_error(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    a = ConfidenceAnalysis(2)
    a.update(make_probs(1, 2, (4, 4), seed=22), make_target(1, 2, (4, 4), seed=22))

    def boom(self, *args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(Figure, "savefig", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        a.plot(tmp_path / "x.png")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("kwargs,match", [
    ({"num_classes": 0}, "num_classes must be a positive integer"),
    ({"num_classes": 3, "num_bins": 0}, "num_bins must be"),
    ({"num_classes": 3, "class_names": ["a"]}, "class_names must be None or 3 names"),
    ({"num_classes": 3, "size_thresholds": (1e5, 1e3)}, "size_thresholds must be strictly increasing"),
    ({"num_classes": 3, "size_groups": ("s", "l")}, "size_groups must be 3 distinct names"),
])
def test_analysis_argument_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ConfidenceAnalysis(**kwargs)


def test_analysis_update_checks_classes():
    a = ConfidenceAnalysis(4)
    with pytest.raises(ValueError, match=r"probs must be 4 class channels"):
        a.update(make_probs(1, 3, (4, 4)), make_target(1, 3, (4, 4)))


def test_public_module_exports():
    assert fastseg.confidence.calibration_stats is calibration_stats
    assert "confidence" in fastseg.__all__
    assert isinstance(calibration_stats(make_probs(1, 2, (3,)), make_target(1, 2, (3,))), CalibrationStats)


# ------------------------------------------------------------------------------------------- distributed

WORLD = 2


def _dist_inputs():
    p = make_probs(2 * WORLD, 3, (6, 5, 4), seed=30)
    t = make_target(2 * WORLD, 3, (6, 5, 4), 255, seed=30)
    return p, t


def _dist_worker(rank, out_dir):
    p, t = _dist_inputs()
    a = ConfidenceAnalysis(3, num_bins=8, ignore_index=255, size_thresholds=(10, 50))
    a.update(p[2 * rank:2 * rank + 2], t[2 * rank:2 * rank + 2])
    torch.save(a.compute(), os.path.join(out_dir, f"r{rank}.pt"))


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not built")
def test_analysis_synchronises_across_gloo_ranks(tmp_path):
    run_on_ranks(_dist_worker, WORLD, tmp_path, str(tmp_path))
    p, t = _dist_inputs()
    single = ConfidenceAnalysis(3, num_bins=8, ignore_index=255, size_thresholds=(10, 50))
    single.update(p, t)
    want = single.compute()
    for rank in range(WORLD):
        got = torch.load(tmp_path / f"r{rank}.pt", weights_only=False)
        for key in ("ece", "mce", "tp_confidence", "gt_voxels", "cases_present"):
            torch.testing.assert_close(got[key], want[key], equal_nan=True)
        torch.testing.assert_close(got["reliability"]["count"], want["reliability"]["count"])
        assert got["cases"] == want["cases"] == 2 * WORLD and got["size_group"] == want["size_group"]


# ------------------------------------------------------------------------------------------------- CUDA

FIXED = 2.0 ** -33  # CUDA rounds each probability to a multiple of 2^-32 (csrc/confidence/confidence_cuda.h)


def assert_cuda_matches_cpu(got, want):
    """Counts exactly; each sum of n probabilities within n * 2^-33 (+ float64 round-off)."""
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.is_cuda and g.dtype == torch.float64 and g.shape == w.shape
        g = g.cpu()
        count_cols = COUNT_COLS[i] + ([2] if i < 2 else [])
        torch.testing.assert_close(g[..., count_cols], w[..., count_cols], rtol=0, atol=0)
        sums = [1] if i < 2 else [1, 3, 5]
        n = w[..., [0] if i < 2 else [0, 2, 4]]
        assert bool(((g[..., sums] - w[..., sums]).abs() <= n * FIXED + 1e-12 * w[..., sums].abs() + 1e-12).all())


@needs_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("nd", (2, 3))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("ignore_index", (None, 255))
def test_cuda_matches_cpu(nd, dtype, layout, ignore_index):
    p = make_probs(2, 5, SPATIAL[nd], dtype, seed=40 + nd, layout=layout)
    t = make_target(2, 5, SPATIAL[nd], ignore_index, seed=40 + nd)
    pc = make_probs(2, 5, SPATIAL[nd], dtype, seed=40 + nd, layout=layout, device="cuda")
    assert pc.stride() == p.stride()
    assert_cuda_matches_cpu(OP(pc, t.cuda(), 15, ignore_index), OP(p, t, 15, ignore_index))


@needs_cuda
@pytest.mark.cuda
# (40, 50) and (200, 15) do not fit the 48 KiB shared-memory histogram: the global-memory path
@pytest.mark.parametrize("C,K", [(1, 1), (2, 15), (21, 15), (40, 50), (200, 15)])
@pytest.mark.parametrize("label_dtype", (torch.uint8, torch.int32, torch.int64), ids=str)
def test_cuda_matches_cpu_classes_and_bins(C, K, label_dtype):
    p = make_probs(2, C, (33, 17, 9), seed=C, num_bins=K)
    t = make_target(2, C, (33, 17, 9), 200 if C < 200 else None, dtype=label_dtype, seed=C)
    ign = 200 if C < 200 else None
    assert_cuda_matches_cpu(OP(p.cuda(), t.cuda(), K, ign), OP(p, t, K, ign))


@needs_cuda
@pytest.mark.cuda
def test_cuda_is_deterministic_and_large():
    p = make_probs(2, 8, (64, 64, 48), torch.float16, seed=50).cuda()
    t = make_target(2, 8, (64, 64, 48), 255, seed=50).cuda()
    a, b = OP(p, t, 15, 255), OP(p, t, 15, 255)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert_cuda_matches_cpu(a, OP(p.cpu(), t.cpu(), 15, 255))


@needs_cuda
@pytest.mark.cuda
def test_cuda_api_checks_labels_compiles_and_analyses():
    p = make_probs(2, 3, (8, 8, 8), seed=51).cuda()
    t = make_target(2, 3, (8, 8, 8), 255, seed=51).cuda()
    with pytest.raises(ValueError, match="got label 3"):
        calibration_stats(p, torch.full_like(t, 3))
    compiled = torch.compile(lambda x, y: calibration_stats(x, y, 10, 255), fullgraph=True)
    for g, w in zip(compiled(p, t), calibration_stats(p, t, 10, 255)):
        assert torch.equal(g, w)
    torch.library.opcheck(torch.ops.fastseg.calibration_stats.default, (p, t, 10, 255))
    a = ConfidenceAnalysis(3, ignore_index=255)
    a.update(p, t)
    b = ConfidenceAnalysis(3, ignore_index=255)
    b.update(p.cpu(), t.cpu())
    ra, rb = a.compute(), b.compute()
    torch.testing.assert_close(ra["ece"], rb["ece"], rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(ra["tp"], rb["tp"], rtol=0, atol=0)
