#!/usr/bin/env python3
"""Forward + backward time and peak extra memory of fused Dice + CE losses: fastseg vs MONAI vs nnU-Net
vs torch.compile of a plain PyTorch reference.

    python benchmarks/bench_dice_ce.py [--device cpu|cuda] [--threads N] [--quick] [--repeat K]
                                       [--out DIR] [--shapes 2x8x96 ...] [--dtypes float32 bfloat16]
                                       [--methods fastseg monai ...] [--merge]

Every (method, shape, dtype) is measured in a fresh subprocess: build the loss, one warm-up step (two for
compiled methods), then one memory step, then K timed steps. Memory on CPU is the growth of peak RSS over
that one step (VmHWM after, reset through /proc/self/clear_refs, minus VmRSS before; freed memory is first
handed back to the OS with malloc_trim), on CUDA torch.cuda.max_memory_allocated over the step; both
relative to the logits' size and including the gradient (ideal ~1.0x). Loss values are reported as
returned (nnU-Net's is fastseg's minus 1) and compared with a float64 evaluation of the same loss.

Writes <out>/<device-name>.md (and a .json of the rows, used by --merge to update rows in place).
"""
from __future__ import annotations

import argparse
import ctypes
import datetime as _dt
import gc
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import torch  # noqa: E402

import _peers  # noqa: E402

RESULT_TAG = "@@BENCH_RESULT "
SMALL_ELEMENTS = 20_000_000  # shapes up to this many logits get the larger default repeat count


# --------------------------------------------------------------------------------------------------------
# Worker: one measurement in this (fresh) process.
# --------------------------------------------------------------------------------------------------------

def _proc_status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{key} not found in /proc/self/status")


def _release_freed_memory() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _cpu_snapshot():
    """(machine busy CPU-seconds from /proc/stat, this process's CPU-seconds, wall time)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:9]]  # user nice system idle iowait irq softirq steal
    busy = (sum(v) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")
    t = os.times()
    return busy, t.user + t.system, time.perf_counter()


def _foreign_load(before, after) -> float:
    """Mean number of CPUs kept busy by *other* processes between two snapshots (in units of cores)."""
    busy = after[0] - before[0]
    own = after[1] - before[1]
    wall = max(after[2] - before[2], 1e-9)
    return max(0.0, (busy - own) / wall)


def _quantile(sorted_values, q: float) -> float:
    """Linear-interpolated quantile of an already sorted list (numpy's default method)."""
    if len(sorted_values) == 1:
        return sorted_values[0]
    pos = q * (len(sorted_values) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def _worker(spec: dict) -> dict:
    device, method, dtype = spec["device"], spec["method"], spec["dtype"]
    shape = tuple(spec["shape"])
    torch.set_num_threads(spec["threads"])
    out = {"method": method, "shape": list(shape), "dtype": dtype, "threads": spec["threads"],
           "device": device, "status": "ok", "measured_at": _now()}

    if method == "copy":
        return _worker_copy(spec, out)

    x, target = _peers.make_inputs(shape, dtype, device, target_dtype=spec["target_dtype"])
    nbytes = x.numel() * x.element_size()
    out["logits_bytes"] = nbytes

    if method == "oracle":  # float64 value and gradient norm of the same loss
        x64 = x.detach().to(torch.float64).requires_grad_(True)
        loss = _peers.reference_dice_ce(x64, target, compute_dtype=torch.float64)
        loss.backward()
        out["loss"] = loss.item()
        out["grad_norm"] = x64.grad.norm().item()
        out["label"] = "float64 reference"
        return out

    try:
        m = _peers.build(method, device)
    except _peers.Unavailable as exc:
        out.update(status="skipped", reason=str(exc), label=method)
        return out
    out["label"], out["note"], out["offset"] = m.label, m.note, m.offset
    if method == "fastseg":
        import fastseg
        from fastseg import _extension
        out["fastseg_build"] = fastseg.build_info()
        so = getattr(getattr(_extension, "_C", None), "__file__", None)
        if so:
            out["fastseg_so_built"] = _dt.datetime.fromtimestamp(
                os.path.getmtime(so), _dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")

    stage = "warm-up"
    try:
        # Warm-up (compiles the compiled methods); its loss value and gradient norm are reported.
        for i in range(spec["warmup"] + (1 if m.compiled else 0)):
            loss = _peers.fwd_bwd(m.fn, x, target)
            _peers.synchronize(device)
            if i == 0:
                out["loss"] = loss.item()
                out["grad_norm"] = x.grad.double().norm().item()
        del loss
        x.grad = None
        _release_freed_memory()

        stage = "memory step"
        # The least of a few single-step measurements: on a busy machine the kernel may evict file-backed pages
        # (library code) from this process between steps, and faulting them back in would count as growth.
        peaks = []
        for _ in range(spec.get("memory_steps", 3)):
            if device.startswith("cuda"):
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                loss = _peers.fwd_bwd(m.fn, x, target)
                torch.cuda.synchronize()
                peaks.append(torch.cuda.max_memory_allocated() - base)
                out["mem_method"] = "cuda max_memory_allocated"
            else:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")
                rss_before = _proc_status_kb("VmRSS")
                loss = _peers.fwd_bwd(m.fn, x, target)
                hwm = _proc_status_kb("VmHWM")
                peaks.append((hwm - rss_before) * 1024)
                out["mem_method"] = "VmHWM - VmRSS"
            del loss
            x.grad = None
            _release_freed_memory()
        peak = min(peaks)
        out["peak_extra_bytes"] = peak
        out["peak_extra_x"] = peak / nbytes
        out["peak_extra_x_all"] = [q / nbytes for q in peaks]

        stage = "timing"
        times = []
        snap = _cpu_snapshot()
        for _ in range(spec["repeat"]):
            x.grad = None
            _peers.synchronize(device)
            t0 = time.perf_counter()
            loss = _peers.fwd_bwd(m.fn, x, target)
            _peers.synchronize(device)
            times.append(time.perf_counter() - t0)
            del loss
        out["other_load_cores"] = _foreign_load(snap, _cpu_snapshot())
    except Exception as exc:  # noqa: BLE001 - a failing peer is reported, not fatal
        msg = f"{type(exc).__name__} during {stage}: {exc}".strip()
        out.update(status="failed", reason=msg.splitlines()[0][:400] if msg else type(exc).__name__)
        return out

    s = sorted(times)
    out.update(repeat=len(times), median_s=statistics.median(s), p20_s=_quantile(s, 0.2),
               p80_s=_quantile(s, 0.8), min_s=s[0], times_s=times)
    return out


def _worker_copy(spec: dict, out: dict) -> dict:
    """Device copy bandwidth: a large tensor clone, bytes read + written per second (median of repeats)."""
    device = spec["device"]
    n = spec["copy_bytes"] // 4
    src = torch.empty(n, dtype=torch.float32, device=device).fill_(1.0)
    dst = src.clone()
    del dst
    times = []
    for _ in range(max(5, spec["repeat"])):
        _peers.synchronize(device)
        t0 = time.perf_counter()
        dst = src.clone()
        _peers.synchronize(device)
        times.append(time.perf_counter() - t0)
        del dst
    t = statistics.median(times)
    out.update(label="tensor clone", copy_bytes=n * 4, median_s=t, bandwidth_Bps=2 * n * 4 / t)
    return out


# --------------------------------------------------------------------------------------------------------
# Parent: run the workers, build and write the table.
# --------------------------------------------------------------------------------------------------------

def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def _slug(text: str, max_words: int = 4) -> str:
    words = re.sub(r"[^a-z0-9]+", " ", text.lower()).split()
    return "-".join(words[:max_words]) or "unknown"


def short_cpu_model(model: str) -> str:
    m = re.sub(r"\((R|TM|tm|r)\)", "", model)
    m = re.sub(r"@.*$", "", m)
    m = re.sub(r"\b(CPU|Processor|\d+-Core|with Radeon.*)\b", "", m, flags=re.I)
    return _slug(m)


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def environment(args) -> dict:
    env = {
        "date": _now(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": cpu_model(),
        "cores": usable_cores(),
        "threads": args.threads,
        "device": args.device,
        "command": " ".join(["python", "benchmarks/bench_dice_ce.py"] + sys.argv[1:]),
    }
    if args.device == "cuda":
        env["gpu"] = torch.cuda.get_device_name(0)
        env["cuda"] = torch.version.cuda
    for mod in ("fastseg", "monai", "nnunetv2"):
        try:
            from importlib.metadata import version
            env[mod] = version(mod)
        except Exception:  # noqa: BLE001
            env[mod] = "not installed"
    try:
        head = subprocess.run(["git", "-C", str(HERE), "describe", "--always", "--dirty"], capture_output=True,
                              text=True, timeout=20).stdout.strip()
        env["git"] = head or "not a git checkout"
    except (OSError, subprocess.SubprocessError):
        env["git"] = "unknown"
    try:
        import fastseg
        env["fastseg_build"] = fastseg.build_info()
    except Exception as exc:  # noqa: BLE001
        env["fastseg_build"] = f"import failed: {exc}"
    return env


def device_name(args) -> str:
    if args.device == "cuda":
        name = _slug(torch.cuda.get_device_name(0), max_words=6)
    else:
        name = f"cpu-{short_cpu_model(cpu_model())}-{args.threads}t"
    return name + ("-quick" if args.quick else "")


def run_worker(spec: dict, timeout: float) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_worker", json.dumps(spec)]
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = str(spec["threads"])
    env["MKL_NUM_THREADS"] = str(spec["threads"])
    env.setdefault("PYTHONWARNINGS", "ignore")
    base = {"method": spec["method"], "shape": list(spec["shape"]), "dtype": spec["dtype"],
            "threads": spec["threads"], "device": spec["device"], "label": spec["method"],
            "measured_at": _now()}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {**base, "status": "failed", "reason": f"timed out after {timeout:.0f} s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG):])
    tail = [ln for ln in (proc.stderr or "").strip().splitlines() if ln.strip()]
    why = tail[-1][:400] if tail else ""
    if proc.returncode < 0:
        why = f"killed by signal {-proc.returncode} (out of memory?) {why}".strip()
    return {**base, "status": "failed", "reason": f"worker exited with {proc.returncode}: {why}",
            "stderr_tail": "\n".join(tail[-15:])}


def wait_for_quiet(max_wait: float, threshold: float = 0.25) -> float:
    """Wait (up to max_wait s) until other processes use less than `threshold` cores; returns the load seen."""
    deadline = time.perf_counter() + max_wait
    told = False
    while True:
        a = _cpu_snapshot()
        time.sleep(2.0)
        load = _foreign_load(a, _cpu_snapshot())
        if load < threshold or time.perf_counter() >= deadline:
            return load
        if not told:
            print(f"  machine busy ({load:.2f} cores used by other processes); waiting up to {max_wait:.0f} s",
                  flush=True)
            told = True


def _is_import_trouble(row: dict) -> bool:
    if row["method"] != "fastseg":
        return False
    if row.get("status") == "ok":
        return not (row.get("fastseg_build") or {}).get("extension", True)
    text = row.get("reason", "") + row.get("stderr_tail", "")
    return any(s in text for s in ("ImportError", "undefined symbol", "fastseg._C", "fastseg/_C", "not importable",
                                   "OSError"))


def fmt_ms(s) -> str:
    return "–" if s is None else f"{s * 1e3:.1f}" if s * 1e3 < 1000 else f"{s * 1e3:.0f}"


def fmt_loss(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, float) and math.isnan(v):
        return "**nan**"
    return f"{v:.6f}"


def render(data: dict) -> str:
    env, rows = data["env"], data["rows"]
    timed = [r for r in rows if r["method"] not in ("oracle", "copy")]
    oracle = {(tuple(r["shape"]), r["dtype"]): r for r in rows if r["method"] == "oracle" and r["status"] == "ok"}
    copy_rows = [r for r in rows if r["method"] == "copy" and r.get("status") == "ok"]
    order = {k: i for i, k in enumerate(_peers.ALL_METHODS)}
    shape_order = []
    for r in rows:
        k = (tuple(r["shape"]), r["dtype"], r["threads"])
        if k not in shape_order and r["method"] != "copy":
            shape_order.append(k)

    def groupkey(r):
        return (shape_order.index((tuple(r["shape"]), r["dtype"], r["threads"])), order.get(r["method"], 99))

    timed.sort(key=groupkey)
    monai = {(tuple(r["shape"]), r["dtype"], r["threads"]): r for r in timed
             if r["method"] == "monai" and r["status"] == "ok"}

    dev = env.get("gpu") if env["device"] == "cuda" else f"CPU {env['cpu']}"
    L = [f"# Dice + CE loss, forward + backward: {data['name']}", ""]
    L += ["One loss evaluation plus its backward on (B, C, D, H, W) logits, as in a training step. Same loss in "
          "every row: softmax, soft Dice (smooth 1e-5) averaged over samples and foreground classes "
          "(background dropped), plus mean voxel cross-entropy.", ""]
    L += ["## Environment", ""]
    L.append(f"- device: {dev}; {env['cores']} usable cores; torch threads: **{env['threads']}**")
    if env["device"] == "cuda":
        L.append(f"- CPU: {env['cpu']}; CUDA {env.get('cuda')}")
    fb = env.get("fastseg_build")
    L.append(f"- torch {env['torch']}, Python {env['python']}, fastseg {env['fastseg']} (build: {fb}), "
             f"MONAI {env['monai']}, nnunetv2 {env['nnunetv2']}")
    for run in data.get("runs", []):
        L.append(f"- run {run['date']}: `{run['command']}` ({run['rows']} row{'s' if run['rows'] != 1 else ''}"
                 + (f", checkout {run['git']}" if run.get("git") else "") + ")")
    builds = sorted({r["fastseg_so_built"] for r in timed if r.get("fastseg_so_built")})
    if builds:
        L.append(f"- fastseg rows measured with the compiled extension built at: {', '.join(builds)}")
    if len(data.get("runs", [])) > 1:
        L.append("- rows come from the runs above (a later run replaces the rows it measured); each speed-up "
                 "divides the MONAI row's median by this row's, which may come from different runs")
    L += ["- inputs: logits ~ N(0, 1) (seed 0, drawn in float32 then cast), labels uniform in [0, C) as an int64 "
          "(B, 1, D, H, W) tensor given to every method; each (method, shape, dtype) runs in a fresh process",
          "- time: wall clock of forward + backward (gradient freshly allocated each step"
          + (", CUDA synchronised" if env["device"] == "cuda" else "")
          + ") after warm-up (+1 step for compiled methods); median and 20th / 80th percentiles of the repeats",
          ("- peak extra memory: torch.cuda.max_memory_allocated over one step minus memory allocated before it"
           if env["device"] == "cuda" else
           "- peak extra memory: peak RSS growth over one step (VmHWM after resetting it via /proc/self/clear_refs, "
           "minus VmRSS before; freed memory trimmed back to the OS first)")
          + "; the least of 3 such steps (2 with --quick)"
          + ", divided by the logits' size; the gradient (1× for same-dtype gradients) is included, so ~1.0× "
          "is the floor",
          "- other load: mean number of cores kept busy by other processes during the timed steps (/proc/stat "
          "minus this process); well above 0 means the row's time was disturbed", ""]

    L += ["## Results", "",
          "| method | shape | dtype | threads | median ms | p20 / p80 ms | speed-up vs MONAI | peak extra mem "
          "(× logits) | loss value | repeats | other load |",
          "|---|---|---|---|---|---|---|---|---|---|---|"]
    skipped = []
    for r in timed:
        sh = _peers.shape_str(r["shape"])
        if r["status"] != "ok":
            skipped.append(r)
            L.append(f"| {r.get('label', r['method'])} | {sh} | {r['dtype']} | {r['threads']} | {r['status']} | "
                     f"| | | | | |")
            continue
        m = monai.get((tuple(r["shape"]), r["dtype"], r["threads"]))
        speed = f"{m['median_s'] / r['median_s']:.2f}×" if m else "–"
        L.append(f"| {r['label']} | {sh} | {r['dtype']} | {r['threads']} | {fmt_ms(r['median_s'])} | "
                 f"{fmt_ms(r['p20_s'])} / {fmt_ms(r['p80_s'])} | {speed} | {r['peak_extra_x']:.2f}× | "
                 f"{fmt_loss(r.get('loss'))} | {r['repeat']} | {r.get('other_load_cores', float('nan')):.2f} |")
    L.append("")

    L += ["## Loss values: do the methods agree?", "",
          "nnU-Net returns CE − mean(Dice) = the others' value − 1 (same gradient); the 'as fastseg' column adds "
          "the 1 back. Reference: the same loss evaluated in float64 on the same (cast) logits.", "",
          "| shape | dtype | method | loss as returned | as fastseg / MONAI | rel. error vs float64 | grad norm |",
          "|---|---|---|---|---|---|---|"]
    for r in timed:
        if r.get("loss") is None:
            continue
        o = oracle.get((tuple(r["shape"]), r["dtype"]))
        conv = r["loss"] + r.get("offset", 0.0)
        err = "–"
        if o is not None:
            err = "nan" if math.isnan(conv) else f"{abs(conv - o['loss']) / abs(o['loss']):.1e}"
        L.append(f"| {_peers.shape_str(r['shape'])} | {r['dtype']} | {r['label']} | {fmt_loss(r['loss'])} | "
                 f"{fmt_loss(conv)} | {err} | {r.get('grad_norm', float('nan')):.6g} |")
    seen = set()
    for r in timed:
        k = (tuple(r["shape"]), r["dtype"])
        if k in oracle and k not in seen:
            seen.add(k)
            o = oracle[k]
            L.append(f"| {_peers.shape_str(r['shape'])} | {r['dtype']} | float64 reference | {fmt_loss(o['loss'])} | "
                     f"{fmt_loss(o['loss'])} | 0 | {o['grad_norm']:.6g} |")
    L.append("")

    if copy_rows:
        c = copy_rows[-1]
        bw = c["bandwidth_Bps"]
        L += ["## Bandwidth", "",
              f"Copy bandwidth ({c['copy_bytes'] / 2**20:.0f} MiB tensor clone, read + written, "
              f"{c['threads']} thread{'s' if c['threads'] != 1 else ''}): **{bw / 1e9:.1f} GB/s**. fastseg's effective bandwidth counts two reads "
              "and one write of the logits (forward reads them, backward reads them and writes the gradient).", "",
              "| shape | dtype | threads | fastseg median ms | effective GB/s | % of copy |", "|---|---|---|---|---|---|"]
        for r in timed:
            if r["method"] == "fastseg" and r["status"] == "ok":
                eff = 3 * r["logits_bytes"] / r["median_s"]
                L.append(f"| {_peers.shape_str(r['shape'])} | {r['dtype']} | {r['threads']} | {fmt_ms(r['median_s'])} "
                         f"| {eff / 1e9:.1f} | {100 * eff / bw:.0f} % |")
        L.append("")

    notes = [r for r in timed if r.get("note") and r["status"] == "ok" and "fallback" in r.get("label", "")]
    if skipped or notes:
        L += ["## Skipped, failed or degraded", ""]
        for r in skipped:
            L.append(f"- {r.get('label', r['method'])}, {_peers.shape_str(r['shape'])} {r['dtype']}: {r['status']}: "
                     f"{r.get('reason', '')}")
        for r in notes:
            L.append(f"- {r['label']}, {_peers.shape_str(r['shape'])} {r['dtype']}: {r['note']}")
        L.append("")
    return "\n".join(L)


def _row_key(r: dict):
    return (r["method"], tuple(r["shape"]), r["dtype"], r["threads"])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: all usable cores)")
    p.add_argument("--quick", action="store_true",
                   help="only 2x8x96^3 in float32 and bfloat16, fewer repeats (what scripts/main.sh runs)")
    p.add_argument("--repeat", type=int, default=None,
                   help="timed steps per row (default: 15 for shapes up to 20M logits, 5 above; 7 with --quick)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first (+1 for compiled methods)")
    p.add_argument("--out", default=str(HERE / "results"), help="directory of the .md/.json results")
    p.add_argument("--shapes", nargs="+", default=None, help="e.g. 2x8x96 (cube) or 2x8x96x96x96")
    p.add_argument("--dtypes", nargs="+", default=None, help="float32 bfloat16 float16 (fp32 bf16 fp16)")
    p.add_argument("--methods", nargs="+", default=None, choices=_peers.ALL_METHODS,
                   help=f"default: {' '.join(_peers.DEFAULT_METHODS)}")
    p.add_argument("--target-dtype", default="int64", choices=tuple(_peers.TARGET_DTYPES))
    p.add_argument("--no-oracle", action="store_true", help="skip the float64 value used to check the losses")
    p.add_argument("--merge", action="store_true",
                   help="update these rows in the existing <out>/<name>.json and re-render the table")
    p.add_argument("--redo-disturbed", type=float, default=None, metavar="CORES",
                   help="re-measure only the rows of the existing <out>/<name>.json that failed or whose 'other "
                        "load' exceeded CORES (implies --merge; same --threads/--quick/--device to find the file)")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per measurement process")
    p.add_argument("--wait-quiet", type=float, default=0.0, metavar="S",
                   help="before each measurement wait up to S seconds for other processes to leave the CPUs idle")
    p.add_argument("--_worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args._worker is not None:
        res = _worker(json.loads(args._worker))
        print(RESULT_TAG + json.dumps(res), flush=True)
        return 0

    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but torch.cuda.is_available() is False")
    if args.threads is None:
        args.threads = usable_cores()
    if args.threads < 1:
        p.error("--threads must be >= 1")
    shapes = [_peers.parse_shape(s) for s in args.shapes] if args.shapes else list(
        _peers.QUICK_SHAPES if args.quick else _peers.FULL_SHAPES)
    dtypes = [_peers.canonical_dtype(d) for d in args.dtypes] if args.dtypes else list(_peers.FULL_DTYPES)
    methods = list(args.methods or _peers.DEFAULT_METHODS)
    if args.device == "cpu" and not os.path.exists("/proc/self/clear_refs"):
        p.error("CPU peak memory needs Linux /proc/self/clear_refs")

    name = device_name(args)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    env = environment(args)
    print(f"# {name}: torch {env['torch']}, {env['cpu']}"
          + (f", GPU {env.get('gpu')}" if args.device == "cuda" else "")
          + f", {args.threads} threads; fastseg build {env['fastseg_build']}", flush=True)

    jobs = []
    if args.redo_disturbed is not None:
        args.merge = True
        json_path = out_dir / f"{name}.json"
        if not json_path.exists():
            p.error(f"--redo-disturbed: {json_path} does not exist")
        for r in json.loads(json_path.read_text())["rows"]:
            if r["method"] in ("oracle", "copy"):
                continue
            if r.get("status") != "ok" or r.get("other_load_cores", 0.0) > args.redo_disturbed:
                n = math.prod(r["shape"])
                repeat = args.repeat or r.get("repeat") or (15 if n <= SMALL_ELEMENTS else 5)
                jobs.append({"device": args.device, "shape": r["shape"], "dtype": r["dtype"], "threads": args.threads,
                             "repeat": repeat, "warmup": args.warmup, "target_dtype": args.target_dtype,
                             "memory_steps": 3, "method": r["method"]})
        print(f"re-measuring {len(jobs)} disturbed or failed rows", flush=True)
        shapes = []
    for shape in shapes:
        for dtype in dtypes:
            n = math.prod(shape)
            repeat = args.repeat or (7 if args.quick else (15 if n <= SMALL_ELEMENTS else 5))
            base = {"device": args.device, "shape": list(shape), "dtype": dtype, "threads": args.threads,
                    "repeat": repeat, "warmup": args.warmup, "target_dtype": args.target_dtype,
                    "memory_steps": 2 if args.quick else 3}
            if not args.no_oracle:
                jobs.append({**base, "method": "oracle"})
            jobs.extend({**base, "method": m} for m in methods)
    if args.redo_disturbed is None:
        jobs.append({"device": args.device, "shape": [0], "dtype": "float32", "threads": args.threads,
                     "repeat": 10, "warmup": 1, "target_dtype": args.target_dtype, "method": "copy",
                     "copy_bytes": 1 << 30 if args.device == "cuda" else 1 << 28})

    rows = []
    t_start = time.perf_counter()
    for i, spec in enumerate(jobs, 1):
        if args.wait_quiet > 0:
            wait_for_quiet(args.wait_quiet)
        t0 = time.perf_counter()
        row = run_worker(spec, args.timeout)
        if _is_import_trouble(row):
            print(f"  fastseg looks unavailable ({row.get('reason') or row.get('fastseg_build')}); "
                  "retrying in 60 s (the extension may be being rebuilt)", flush=True)
            time.sleep(60)
            row = run_worker(spec, args.timeout)
        rows.append(row)
        what = (f"{spec['method']:<13} {_peers.shape_str(spec['shape']):<12} {spec['dtype']:<9}"
                if spec["method"] != "copy" else f"{'copy':<13} {spec['copy_bytes'] >> 20} MiB clone")
        if row["status"] != "ok":
            msg = f"{row['status'].upper()}: {row.get('reason')}"
        elif spec["method"] == "copy":
            msg = f"{row['bandwidth_Bps'] / 1e9:.1f} GB/s"
        elif spec["method"] == "oracle":
            msg = f"loss {row['loss']:.6f} (float64)"
        else:
            msg = (f"median {fmt_ms(row['median_s'])} ms (p20 {fmt_ms(row['p20_s'])}, p80 {fmt_ms(row['p80_s'])}), "
                   f"peak extra {row['peak_extra_x']:.2f}x logits, loss {row['loss']:.6f}"
                   + f", other load {row.get('other_load_cores', 0):.2f} cores"
                   + (f" (+{row['offset']:g} = {row['loss'] + row['offset']:.6f} in fastseg's convention)"
                      if row.get("offset") else ""))
        print(f"[{i}/{len(jobs)}] {what} {msg}  [{time.perf_counter() - t0:.0f} s]", flush=True)

    json_path = out_dir / f"{name}.json"
    data = {"name": name, "env": env, "rows": rows, "runs": []}
    if args.merge and json_path.exists():
        old = json.loads(json_path.read_text())
        new_keys = {_row_key(r) for r in rows}
        kept = [r for r in old["rows"] if _row_key(r) not in new_keys]
        data["rows"] = kept + rows
        data["runs"] = old.get("runs", [])
    data["runs"].append({"date": env["date"], "command": env["command"], "rows": len(rows), "git": env.get("git")})

    table = render(data)
    print()
    print(table)
    (out_dir / f"{name}.md").write_text(table + "\n")
    json_path.write_text(json.dumps(data, indent=1) + "\n")
    print(f"wrote {out_dir / (name + '.md')} and {json_path.name} in {time.perf_counter() - t_start:.0f} s",
          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
