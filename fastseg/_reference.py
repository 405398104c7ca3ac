"""Pure-PyTorch versions of fastseg's ops: the oracle of the tests and the fallback without the extension.

They follow the op contracts in csrc/fastseg.cpp exactly but materialise probabilities and one-hot
targets, so they cost several times the logits in memory.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

SOFTMAX, SIGMOID = 0, 1


def check_labels(labels: torch.Tensor, num_classes: int, ignore_index: Optional[int],
                 op: str = "fastseg.dice_ce") -> None:
    """Raise if a label is neither a class in [0, num_classes) nor ignore_index (one host sync)."""
    if labels.numel() == 0:
        return
    labels = labels.long()
    valid = (labels >= 0) & (labels < num_classes)
    if ignore_index is not None:
        valid |= labels == ignore_index
    if not bool(valid.all()):
        bad = labels[~valid][0].item()
        also = f" or ignore_index={ignore_index}" if ignore_index is not None else ""
        raise ValueError(
            f"{op}: target must hold class labels in [0, {num_classes}){also}, got label {bad}"
        )


def dice_ce_stats(
    logits: torch.Tensor,
    target: torch.Tensor,
    activation: int,
    ignore_index: Optional[int],
    squared_pred: bool,
) -> torch.Tensor:
    """(B, C, 5) sums [I, P, G, A, U] of csrc/dice_ce/dice_ce.h, differentiable by autograd."""
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    x = logits.to(acc)
    B, C, N = x.shape
    if target.dim() == 2:
        if not torch.compiler.is_compiling():
            check_labels(target, C, ignore_index)
        labels = target.long()
        valid = torch.ones_like(labels, dtype=torch.bool) if ignore_index is None else labels != ignore_index
        classes = torch.arange(C, device=x.device).view(1, C, 1)
        g = ((labels.unsqueeze(1) == classes) & valid.unsqueeze(1)).to(acc)
    else:
        g = target.to(acc)
        valid = torch.ones((B, N), dtype=torch.bool, device=x.device)
    m = valid.unsqueeze(1).to(acc)
    if activation == SOFTMAX:
        logp = torch.log_softmax(x, dim=1)
        p = logp.exp()
        A = (g * -logp * m).sum(2)
        U = (-logp * m).sum(2)
    else:
        p = torch.sigmoid(x)
        A = (g * F.softplus(-x) * m).sum(2)
        U = ((1 - g) * F.softplus(x) * m).sum(2)
    pp, gg = (p * p, g * g) if squared_pred else (p, g)
    I = (p * g * m).sum(2)
    P = (pp * m).sum(2)
    G = (gg * m).sum(2)
    return torch.stack([I, P, G, A, U], dim=-1)


def distance_transform_edt(mask: torch.Tensor, spacing: list[float]) -> torch.Tensor:
    """Exact Euclidean distance transform: the contract of the op fastseg::edt (csrc/fastseg.cpp).

    mask (B, *spatial) with 1 to 3 spatial dims, nonzero = foreground; spacing holds one value per spatial
    axis or B rows of them, flattened. Returns (B, *spatial) float32 on the mask's device: per sample,
    scipy.ndimage.distance_transform_edt(mask[b], sampling=spacing) rounded to float32, bit for bit.

    Like the kernels (csrc/edt/edt.h) it carries the integer offsets to the nearest zero found so far and
    evaluates scipy's float64 expression sqrt(sum_k fl(fl(offset_k s_k)^2)) from them at the end. Each sample
    is first cropped to the bounding box of its foreground grown by one voxel, which is exact: a zero voxel
    outside the box has a zero voxel at least as close on the box's border. Then one pass per axis: cumulative
    max / min of zero positions along axis 0, and for each further axis k the minimiser over q of
    f(q) + (s_k (p - q))^2 along every line, found by divide and conquer on p: the leftmost minimiser is
    monotone in p (the cost matrix is Monge), so the minimiser of the middle p bounds the search of each half.
    All lines and all intervals of one recursion level are evaluated at once with flat tensor ops: O(N log n)
    work for N voxels and lines of n, in chunks of lines to bound memory.
    """
    nd = mask.dim() - 1
    B = mask.shape[0]
    sp = [float(v) for v in spacing]
    out = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
    for b in range(B):
        s = sp if len(sp) == nd else sp[b * nd:(b + 1) * nd]
        out[b] = _edt_one(mask[b] != 0, s)
    return out


def _edt_term(offset: torch.Tensor, s: float) -> torch.Tensor:
    x = offset.to(torch.float64) * s
    return x * x


def _edt_one(fg: torch.Tensor, s: list[float]) -> torch.Tensor:
    out = torch.zeros(fg.shape, dtype=torch.float32, device=fg.device)
    nd = fg.dim()
    if fg.numel() == 0 or not bool(fg.any()):
        return out
    if bool(fg.all()):
        # scipy's convention without any zero voxel: its features stay at (-1, 0, 0).
        idx = torch.meshgrid(*[torch.arange(n, device=fg.device) for n in fg.shape], indexing="ij")
        sq = _edt_term(idx[0] + 1, s[0])
        for k in range(1, nd):
            sq = sq + _edt_term(idx[k], s[k])
        return sq.sqrt().float()
    box = []
    for k in range(nd):
        other = tuple(j for j in range(nd) if j != k)
        hit = (fg.any(dim=other) if other else fg).nonzero()
        box.append(slice(max(int(hit[0]) - 1, 0), min(int(hit[-1]) + 2, fg.shape[k])))
    box = tuple(box)
    offsets = _edt_offsets(fg[box], s)
    sq = _edt_term(offsets[0], s[0])
    for k in range(1, nd):
        sq = sq + _edt_term(offsets[k], s[k])
    out[box] = sq.sqrt().float()
    return out


def _edt_offsets(fg: torch.Tensor, s: list[float]) -> list[torch.Tensor]:
    """Per axis, the offset (in voxels) of every voxel to its nearest zero voxel (fg holds at least one)."""
    nd, shape, dev = fg.dim(), fg.shape, fg.device
    far = 1 << 40
    pos = torch.arange(shape[0], device=dev).view(-1, *([1] * (nd - 1)))
    zero = ~fg
    before = torch.where(zero, pos, -far).cummax(0).values
    after = torch.where(zero, pos, far).flip(0).cummin(0).values.flip(0)
    o0 = torch.minimum(pos - before, after - pos)
    finite = o0 < far // 2
    offsets = [torch.where(finite, o0, 0)]
    f = torch.where(finite, _edt_term(offsets[0], s[0]), torch.inf)
    for k in range(1, nd):
        lines = f.movedim(k, -1)
        n = lines.shape[-1]
        F = lines.reshape(-1, n)
        q = _edt_argmin(F, s[k] * s[k])
        d = torch.arange(n, device=dev) - q
        new = [o.movedim(k, -1).reshape(-1, n).gather(1, q) for o in offsets] + [d.abs()]
        dd = d.to(torch.float64) * s[k]
        f = F.gather(1, q) + dd * dd
        back = lambda t: t.reshape(lines.shape).movedim(-1, k)  # noqa: E731
        offsets, f = [back(o) for o in new], back(f)
    return offsets


def _edt_argmin(F: torch.Tensor, w: float, chunk: int = 1 << 20) -> torch.Tensor:
    """(L, n) leftmost argmin over q of F[l, q] + w (p - q)^2 for every (l, p); F may hold inf."""
    L, n = F.shape
    dev = F.device
    out = torch.empty((L, n), dtype=torch.long, device=dev)
    for r0 in range(0, L, max(1, chunk // n)):
        Fc = F[r0:r0 + max(1, chunk // n)]
        oc = out[r0:r0 + Fc.shape[0]]
        line = torch.arange(Fc.shape[0], device=dev)
        pl, pr = torch.zeros_like(line), torch.full_like(line, n - 1)
        a, b = torch.zeros_like(line), torch.full_like(line, n - 1)
        while line.numel():
            p = (pl + pr) // 2
            counts = b - a + 1
            T = line.numel()
            task = torch.repeat_interleave(torch.arange(T, device=dev), counts)
            first = counts.cumsum(0) - counts
            q = a[task] + torch.arange(task.numel(), device=dev) - first[task]
            d = (p[task] - q).to(torch.float64)
            cost = Fc[line[task], q] + w * d * d
            best = torch.full((T,), torch.inf, dtype=cost.dtype, device=dev).scatter_reduce(0, task, cost, "amin")
            cand = torch.where(cost == best[task], q, n)
            qs = torch.full((T,), n, dtype=torch.long, device=dev).scatter_reduce(0, task, cand, "amin")
            oc[line, p] = qs
            left, right = pl < p, p < pr
            line = torch.cat([line[left], line[right]])
            a, b = torch.cat([a[left], qs[right]]), torch.cat([qs[left], b[right]])
            pl, pr = torch.cat([pl[left], p[right] + 1]), torch.cat([p[left] - 1, pr[right]])
    return out


def calibration_stats(
    probs: torch.Tensor, target: torch.Tensor, num_bins: int, ignore_index: Optional[int]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The contract of fastseg::calibration_stats (csrc/confidence/confidence.h) with float64 tensor ops.

    probs (B, C, *spatial), target (B, *spatial) integer labels. Returns float64 class-wise bins
    (C, num_bins, 3), top-label bins (num_bins, 3) and confusion sums (C, 6). Materialises the probabilities
    as (B * N, C) float64, and one class's bin updates at a time.
    """
    B, C = probs.shape[:2]
    dev = probs.device
    # (M, C) float64, clamped to [0, 1] with NaN read as 0 (nan_to_num sends +-inf to +-max first).
    p = torch.nan_to_num(probs.reshape(B, C, -1).transpose(1, 2).reshape(-1, C).to(torch.float64), nan=0.0)
    p = p.clamp(0.0, 1.0)
    labels = target.reshape(-1).long()
    if not torch.compiler.is_compiling():
        check_labels(labels, C, ignore_index, "fastseg.calibration_stats")
    valid = (labels >= 0) & (labels < C)
    if ignore_index is not None:
        valid = valid & (labels != ignore_index)
    w = valid.to(torch.float64)
    y = torch.where(valid, labels, 0)

    def bin_of(v: torch.Tensor) -> torch.Tensor:
        return (v * num_bins).floor().long().clamp(0, num_bins - 1)

    classwise = torch.zeros((C, num_bins, 3), dtype=torch.float64, device=dev)
    for c in range(C):
        pc = p[:, c]
        hit = ((labels == c) & valid).to(torch.float64)
        classwise[c].index_add_(0, bin_of(pc), torch.stack([w, pc * w, hit], dim=1))

    conf, pred = p.max(dim=1)  # the first maximum on ties, as the kernels
    agree = ((pred == y) & valid).to(torch.float64)
    top = torch.zeros((num_bins, 3), dtype=torch.float64, device=dev)
    top.index_add_(0, bin_of(conf), torch.stack([w, conf * w, agree], dim=1))

    miss = w - agree
    p_true = p.gather(1, y.unsqueeze(1)).squeeze(1)
    zero = torch.zeros_like(w)
    confusion = torch.zeros((C, 6), dtype=torch.float64, device=dev)
    confusion.index_add_(0, pred, torch.stack([agree, conf * agree, miss, conf * miss, zero, zero], dim=1))
    confusion.index_add_(0, y, torch.stack([zero, zero, zero, zero, miss, p_true * miss], dim=1))
    return classwise, top, confusion


def patch_stats(label: torch.Tensor, patch_sizes: list[int], num_classes: int,
                ignore_label: Optional[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The contract of fastseg::patch_stats (csrc/fastseg.cpp) by explicit window counts.

    label (*spatial) integer labels, 1 to 3 axes; patch_sizes K sizes flattened. Returns (K, 5, C) float64
    [random count, random presence, foreground count, foreground presence, coverage], (C,) int64 voxel
    counts and (K, C, C) float64 co-presence. Per class, the patch's voxel count is tabulated at every
    position whose window can meet the class's bounding box (separable cumulative sums), and read at the
    start of every foreground voxel's centred patch, per source class (co-presence) and averaged over the
    sources (foreground mode); memory is about the class's box grown by the patch, in int64. Coverage: the
    class's voxels in the centred patch of each of its voxels, by the same separable sums over its box.
    """
    nd, C = label.dim(), num_classes
    shape = tuple(label.shape)
    K = len(patch_sizes) // nd
    lab = label.long().cpu()
    if not torch.compiler.is_compiling():
        check_labels(lab, C, ignore_label, "fastseg::patch_stats")
    # ignored voxels get code C: a class of their own for the counts, reported nowhere
    code = lab if ignore_label is None else torch.where(lab == ignore_label, C, lab)
    totals = torch.bincount(code.reshape(-1), minlength=C + 1)
    present = [c for c in range(1, C + 1) if totals[c] > 0]
    fg_classes = [c for c in present if c < C]

    voxels = torch.nonzero(code)  # (N, nd) every non-background voxel
    codes = code[tuple(voxels.T)]
    is_source = torch.isin(codes, torch.tensor(fg_classes, dtype=codes.dtype))  # voxels foreground patches centre on
    fg_voxels, fg_codes = voxels[is_source], codes[is_source]
    regions = {c: _crop(code, voxels[codes == c], c) for c in present}
    nonbg = _crop(code, voxels, None) if present else None

    stats = torch.zeros((K, 5, C), dtype=torch.float64)
    joint = torch.zeros((K, C, C), dtype=torch.float64)
    for k in range(K):
        patch = patch_sizes[k * nd:(k + 1) * nd]
        padded = [max(s, p) for s, p in zip(shape, patch)]
        pad = [(q - s) // 2 for q, s in zip(padded, shape)]
        last = [q - p for q, p in zip(padded, patch)]
        positions = math.prod(n + 1 for n in last)
        starts = torch.stack([(fg_voxels[:, a] + pad[a] - patch[a] // 2).clamp(0, last[a])
                              for a in range(nd)], dim=1)

        def given_source(begin: list[int], grid: torch.Tensor) -> torch.Tensor:
            """(C,) per source class s, the mean of grid[start(v)] over its voxels v (0 off the grid)."""
            idx = starts - torch.tensor(begin)
            inside = ((idx >= 0) & (idx < torch.tensor(grid.shape))).all(dim=1)
            values = torch.zeros(len(fg_codes), dtype=torch.float64)
            values[inside] = grid[tuple(idx[inside].T)].double()
            sums = torch.bincount(fg_codes, weights=values, minlength=C + 1)[:C]
            return sums / totals[:C].clamp(min=1).double()

        volume = float(math.prod(patch))
        counted = [0.0, 0.0]
        for c in present:
            counts, begin = _window_counts(*regions[c], patch, pad, last, meets=True)
            hit = counts > 0
            rc, rp = float(counts.sum()) / positions, float(hit.sum()) / positions
            if fg_classes:
                # a foreground patch draws its class uniformly, then a voxel of it
                given_hit = given_source(begin, hit)
                fc, fp = float(given_source(begin, counts)[fg_classes].mean()), float(given_hit[fg_classes].mean())
            else:
                fc, fp = rc, rp
            counted[0] += rc
            counted[1] += fc
            if c < C:
                seen = _centred_patch_counts(*regions[c], patch, pad, last)
                cover = float((seen * regions[c][0]).sum()) / float(totals[c]) ** 2
                stats[k, :, c] = torch.tensor([rc, rp, fc, fp, cover], dtype=torch.float64)
                if fg_classes:
                    joint[k, fg_classes, c] = given_hit[fg_classes]
        full_random = full_fg = 0.0
        if nonbg is not None:
            full, begin = _window_counts(*nonbg, patch, pad, last, meets=False)
            inside = full == volume
            full_random = float(inside.sum()) / positions
            full_fg = full_random
            if fg_classes:
                given_inside = given_source(begin, inside)[fg_classes]
                full_fg = float(given_inside.mean())
                joint[k, fg_classes, 0] = 1.0 - given_inside
        stats[k, :4, 0] = torch.tensor([volume - counted[0], 1.0 - full_random, volume - counted[1],
                                       1.0 - full_fg], dtype=torch.float64)
    return stats, totals[:C].clone(), joint


def _crop(code: torch.Tensor, voxels: torch.Tensor, value: Optional[int]
          ) -> tuple[torch.Tensor, list[int], list[int]]:
    """The int64 mask code == value (code != 0 for None) in the bounding box [lo, hi) of its voxels (N, nd)."""
    lo, hi = voxels.min(dim=0).values.tolist(), (voxels.max(dim=0).values + 1).tolist()
    box = code[tuple(slice(b, e) for b, e in zip(lo, hi))]
    return (box != 0 if value is None else box == value).long(), lo, hi


def _centred_patch_counts(mask: torch.Tensor, lo: list[int], hi: list[int], patch, pad, last) -> torch.Tensor:
    """At every voxel v of a cropped mask (box [lo, hi)), its voxels inside the foreground patch centred on v."""
    counts = mask
    for a in range(mask.dim()):
        v = torch.arange(lo[a], hi[a])
        first = (v + pad[a] - patch[a] // 2).clamp(0, last[a]) - pad[a] - lo[a]  # the window, from the box
        start, stop = first.clamp(0, hi[a] - lo[a]), (first + patch[a]).clamp(0, hi[a] - lo[a])
        counts = _range_sums(counts, a, start, stop)
    return counts


def _range_sums(counts: torch.Tensor, axis: int, start: torch.Tensor, stop: torch.Tensor) -> torch.Tensor:
    """Sums of ``counts`` over [start[i], stop[i]) along ``axis``, one per i, from one cumulative sum."""
    table = F.pad(counts.cumsum(axis), [0, 0] * (counts.dim() - 1 - axis) + [1, 0])
    return table.index_select(axis, stop) - table.index_select(axis, start)


def _window_counts(counts: torch.Tensor, lo: list[int], hi: list[int], patch, pad, last,
                   meets: bool) -> tuple[torch.Tensor, list[int]]:
    """Voxels of a cropped mask (box [lo, hi)) in the window of each patch position, over the positions
    whose window meets the box (meets) or lies inside it (not meets); returns the counts and the first
    position per axis."""
    nd = counts.dim()
    begin = []
    for a in range(nd):
        # window of position q, in the unpadded image: [q - pad, q - pad + patch)
        if meets:
            first, final = max(0, lo[a] + pad[a] - patch[a] + 1), min(last[a], hi[a] - 1 + pad[a])
        else:
            first, final = lo[a] + pad[a], min(last[a], hi[a] - patch[a] + pad[a])
        q = torch.arange(first, max(first, final + 1))
        start = (q - pad[a] - lo[a]).clamp(0, hi[a] - lo[a])
        stop = (q - pad[a] + patch[a] - lo[a]).clamp(0, hi[a] - lo[a])
        counts = _range_sums(counts, a, start, stop)
        begin.append(first)
    return counts, begin
