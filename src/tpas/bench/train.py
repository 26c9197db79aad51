"""Training throughput: pairs/s, peak memory, and where each step's time goes (waiting for the
DataLoader, forward, backward, optimizer) for several loader settings, on the real loop's pieces
(tpas.train: PairDataset, ResumableSampler, make_loader, training_step).

A setting is `w<N>` (N DataLoader workers) optionally followed by `+memory` or `+disk` (the
--image-cache of train.py: images decoded once, pre-resized). Each runs --warmup steps, then
--steps timed ones, on the same model and optimizer (so settings differ only in the loader).

    python -m tpas.bench train                                  # lite, batch 16, demo data
    python -m tpas.bench train --settings w0 --settings w1+memory --steps 10
"""
# tpas.cli.field returns a dataclasses.field (it only adds the --help text), so RUF009 does not apply.
# ruff: noqa: RUF009

from __future__ import annotations

import datetime
import os
import platform
import re
import resource
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from tpas import models as model_lib
from tpas.cli import config_command, field
from tpas.data import ensure_data, load_train_annotations
from tpas.errors import TpasError
from tpas.io import write_json
from tpas.runtime import Runtime, resolve_runtime
from tpas.train.data import (
    PairDataset,
    ResumableSampler,
    build_image_cache,
    leading_resize,
    make_collate,
    make_loader,
)
from tpas.train.loop import training_step

SETTING = re.compile(r"^w(\d+)(?:\+(memory|disk))?$")


@dataclass
class BenchTrainConfig:
    data_root: Path = field(Path("data/demo"), "PAB-layout data root (the demo set is built when empty).")
    model: str = field("lite", "Model preset.", choices=list(model_lib.PRESETS))
    batch_size: int = field(16, "Pairs per step.")
    subset: int = field(2000, "Training pairs sampled (seeded) for the loader; more than the steps need.")
    steps: int = field(10, "Timed steps per setting.")
    warmup: int = field(2, "Untimed steps per setting before the timed ones (workers start, caches fill).")
    settings: list[str] = field(
        ["w0", "w1", "w2", "w0+memory", "w1+memory"],
        "Loader settings to time, in order: w<workers>[+memory|+disk]. Repeat the flag for several.",
    )
    device: str = field("auto", "auto, cpu or cuda (as train.py).", choices=["auto", "cpu", "cuda"])
    precision: str = field("auto", "auto, fp32, bf16 or fp16 (as train.py).", choices=["auto", "fp32", "bf16", "fp16"])
    threads: int = field(0, "Torch CPU threads (0 = torch's default: all cores).")
    seed: int = field(0, "Seed for the subset, the model and the batches.")
    output: Path = field(Path("outputs/bench/train.json"), "Where the results go (JSON).")
    progress: bool = field(True, "Show progress bars.")


def _private_mb(pid: int) -> float:
    """Memory only this process holds (private pages, USS), from /proc: what a forked DataLoader
    worker adds beyond the pages it shares with the main process; 0 where there is none (not Linux)."""
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return 0.0
    return sum(int(kb) for kb in re.findall(r"^Private_(?:Clean|Dirty):\s+(\d+) kB", text, re.MULTILINE)) / 1024


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds a process has used so far (/proc/<pid>/stat); 0 where unreadable."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def _worker_pids(loader: torch.utils.data.DataLoader) -> list[int]:
    iterator = getattr(loader, "_iterator", None)
    return [w.pid for w in getattr(iterator, "_workers", [])]


def time_setting(
    cfg: BenchTrainConfig,
    setting: str,
    frame: Any,
    model: model_lib.RetrievalModel,
    text: Any,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    runtime: Runtime,
) -> dict:
    match = SETTING.match(setting)
    if not match:
        raise TpasError(
            f"--settings {setting!r}: expected w<workers> optionally followed by +memory or +disk, e.g. w2+memory."
        )
    workers, cache_mode = int(match[1]), match[2] or "none"
    transform = model_lib.image_transform(model.cfg, train=True)
    dataset = PairDataset(frame, cfg.data_root, transform, cfg.seed)
    cache_s, cache_mb = 0.0, 0.0
    if cache_mode != "none":
        resize = leading_resize(transform)
        if resize is None:
            raise TpasError(f"--settings {setting}: the {cfg.model} transform has no fixed-size Resize to cache.")
        start = time.perf_counter()
        folder = cfg.output.parent / "train_image_cache"
        dataset.cache = build_image_cache(
            dataset.image_paths(), cfg.data_root, resize, cache_mode, folder, progress=cfg.progress
        )
        cache_s, cache_mb = time.perf_counter() - start, dataset.cache.array.nbytes / 2**20
    sampler = ResumableSampler(len(dataset), cfg.seed, cfg.batch_size)
    loader = make_loader(dataset, sampler, make_collate(text), workers, runtime, cfg.seed)
    if runtime.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(runtime.device)
    totals: dict[str, float] = {}
    per_step: list[float] = []
    batches = iter(loader)
    workers_cpu = 0.0
    bar = tqdm(range(cfg.warmup + cfg.steps), desc=setting, disable=not cfg.progress, leave=False)
    for step in bar:
        if step == cfg.warmup:
            workers_cpu = -sum(_cpu_s(pid) for pid in _worker_pids(loader))
        timings: dict[str, float] = {}
        start, cpu_start = time.perf_counter(), time.process_time()
        try:
            batch = next(batches)
        except StopIteration:  # next epoch
            sampler.epoch += 1
            batches = iter(loader)
            batch = next(batches)
        timings["wait"] = time.perf_counter() - start
        # CPU seconds do not stretch when other work shares the cores, unlike wall seconds
        timings["load_cpu_main"], cpu_start = time.process_time() - cpu_start, time.process_time()
        training_step(model, [batch], optimizer, scaler, runtime, timings)
        timings["model_cpu"] = time.process_time() - cpu_start
        if step >= cfg.warmup:
            per_step.append(time.perf_counter() - start)
            for name, seconds in timings.items():
                totals[name] = totals.get(name, 0.0) + seconds
    workers_cpu += sum(_cpu_s(pid) for pid in _worker_pids(loader))
    worker_mb = sum(_private_mb(pid) for pid in _worker_pids(loader))
    del batches, loader
    wall = sum(per_step)
    result = {
        "setting": setting,
        "workers": workers,
        "image_cache": cache_mode,
        "steps": cfg.steps,
        "pairs_per_s": round(cfg.batch_size * cfg.steps / wall, 2),
        "step_s": round(wall / cfg.steps, 4),
        "step_s_median": round(float(np.median(per_step)), 4),
    }
    result.update(
        {
            f"{name}_s": round(totals.get(name, 0.0) / cfg.steps, 4)
            for name in ("wait", "forward", "backward", "optimizer")
        }
    )
    result["wait_share"] = round(totals.get("wait", 0.0) / wall, 3)
    # CPU seconds per step: the model's (main process, outside the wait) and the loading's (the
    # workers', or the main process's while it waited); on a shared machine these stay meaningful
    result["model_cpu_s"] = round(totals.get("model_cpu", 0.0) / cfg.steps, 4)
    result["load_cpu_s"] = round((totals.get("load_cpu_main", 0.0) + workers_cpu) / cfg.steps, 4)
    result.update(
        {
            "main_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "workers_private_mb": round(worker_mb, 1),
            "cache_mb": round(cache_mb, 1),
            "cache_build_s": round(cache_s, 2),
        }
    )
    if runtime.device.type == "cuda":
        result["cuda_peak_mb"] = round(torch.cuda.max_memory_allocated(runtime.device) / 2**20, 1)
    return result


def format_table(results: list[dict]) -> str:
    columns = [
        ("setting", "setting", "{}"),
        ("pairs/s", "pairs_per_s", "{:.1f}"),
        ("s/step", "step_s", "{:.3f}"),
        ("wait", "wait_s", "{:.3f}"),
        ("forward", "forward_s", "{:.3f}"),
        ("backward", "backward_s", "{:.3f}"),
        ("optim", "optimizer_s", "{:.3f}"),
        ("wait %", "wait_share", "{:.0%}"),
        ("model CPU s", "model_cpu_s", "{:.2f}"),
        ("loading CPU s", "load_cpu_s", "{:.3f}"),
        ("peak RSS MB", "main_peak_rss_mb", "{:.0f}"),
        ("workers private MB", "workers_private_mb", "{:.0f}"),
        ("cache MB (build s)", None, None),
    ]
    if any("cuda_peak_mb" in r for r in results):
        columns.append(("CUDA peak MB", "cuda_peak_mb", "{:.0f}"))
    lines = ["| " + " | ".join(c[0] for c in columns) + " |", "|" + "---|" * len(columns)]
    for r in results:
        cells = []
        for _, key, fmt in columns:
            if key is None:
                cells.append(f"{r['cache_mb']:.0f} ({r['cache_build_s']:.1f})" if r["image_cache"] != "none" else "-")
            else:
                cells.append(fmt.format(r[key]) if key in r else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run(cfg: BenchTrainConfig) -> dict:
    if cfg.steps < 1 or cfg.warmup < 0:
        raise TpasError("--steps must be at least 1 and --warmup at least 0.")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    load_before = os.getloadavg()
    ensure_data(cfg.data_root, cfg.seed)
    frame, _ = load_train_annotations(cfg.data_root)
    if len(frame) < cfg.batch_size:
        raise TpasError(f"{cfg.data_root}: {len(frame)} training pairs, fewer than --batch-size {cfg.batch_size}.")
    frame = frame.sample(min(cfg.subset, len(frame)), random_state=cfg.seed).reset_index(drop=True)
    runtime = resolve_runtime(cfg.device, cfg.precision)
    torch.manual_seed(cfg.seed)
    model_cfg = model_lib.ModelConfig.from_preset(cfg.model)
    model = model_lib.build_model(model_cfg).to(runtime.device).train()
    text = model_lib.build_text_pipeline(model_cfg)
    optimizer = torch.optim.AdamW(model.param_groups(0.01, 1e-4, 5.0), lr=1e-4)
    scaler = torch.amp.GradScaler(runtime.device.type, enabled=runtime.amp_dtype == torch.float16)
    results = [time_setting(cfg, s, frame, model, text, optimizer, scaler, runtime) for s in cfg.settings]
    report = {
        "config": cfg,
        "results": results,
        "machine": {
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "device": str(runtime.device),
            "precision": runtime.precision,
            "torch": torch.__version__,
            "python": platform.python_version(),
            "gpu": torch.cuda.get_device_name(runtime.device) if runtime.device.type == "cuda" else None,
            # the 1-minute load average before and after: other work on the machine skews the figures
            "load_average_before": round(load_before[0], 2),
            "load_average_after": round(os.getloadavg()[0], 2),
        },
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
    }
    write_json(cfg.output, report)
    return report


@config_command(
    BenchTrainConfig,
    help="Time training steps (data wait / forward / backward / optimizer) for several loader settings.",
)
def main(cfg: BenchTrainConfig) -> None:
    report = run(cfg)
    machine = report["machine"]
    print(format_table(report["results"]))
    print(
        f"{cfg.model}, batch {cfg.batch_size}, {cfg.steps} timed steps per setting on {machine['device']} "
        f"({machine['precision']}, {machine['torch_threads']} torch threads, {machine['cpus']} CPUs, load average "
        f"{machine['load_average_before']} -> {machine['load_average_after']}) -> {cfg.output}"
    )


if __name__ == "__main__":
    main()
