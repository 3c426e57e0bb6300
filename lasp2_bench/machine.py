"""Where a benchmark ran and where its results go: machine description, matmul rate, peak memory,
results folder benchmarks/results/<date>-<machine>/, CSV writing."""
from __future__ import annotations

import csv
import datetime
import os
import platform
import re
import socket
import time
from pathlib import Path

import torch


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe(device: torch.device) -> dict:
    info = {"torch": torch.__version__, "python": platform.python_version(), "cpu": cpu_name(),
            "cpu_cores": os.cpu_count(), "device": device.type}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["gpus"] = torch.cuda.device_count()
    try:
        info["memory_gib"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError):
        pass
    return info


def machine_tag(device: torch.device) -> str:
    """Short folder-safe name: 'cpu2' (cores) or the GPU's name ('nvidia-h100-80gb-hbm3')."""
    if device.type == "cuda":
        return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-")
    return f"cpu{os.cpu_count()}"


def results_dir(device: torch.device, root: Path | None = None) -> Path:
    root = root or Path("benchmarks") / "results"
    out = root / f"{datetime.date.today()}-{machine_tag(device)}"
    out.mkdir(parents=True, exist_ok=True)
    return out


def matmul_rate(device: torch.device, dtype=torch.float32, n: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of one large square matmul on this device with the current thread count."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    sync(device)
    return repeats * 2 * n**3 / (time.perf_counter() - start)


def free_port() -> int:
    """A TCP port nothing listens on now, for one configuration's freshly spawned ranks (a port
    derived from the pid would be reused by the next configuration while the last one's sockets
    linger)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_rank(rank: int, world: int, port: int, use_cuda: bool, threads: int | None = None,
               timeout_s: int = 1800) -> torch.device:
    """A freshly spawned rank joins its process group (NCCL with one GPU a rank, else gloo) with
    `threads` threads (default: the cores shared by the ranks); returns its device."""
    import datetime
    import os

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(threads or max(1, (os.cpu_count() or 2) // world))
    device = torch.device("cuda", rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if use_cuda else "gloo", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=timeout_s))
    return device


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak_memory(device: torch.device) -> None:
    """CUDA: reset max allocated. CPU: reset the process's RSS high-water mark (Linux
    /proc/self/clear_refs; where that is refused the peak stays process-wide)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_memory_bytes(device: torch.device) -> int:
    """CUDA max allocated, or the RSS high-water mark (VmHWM) on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def write_csv(path: Path, rows: list[dict], fields: list[str]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def read_csv(path: Path) -> list[dict]:
    with path.open() as f:
        return list(csv.DictReader(f))
