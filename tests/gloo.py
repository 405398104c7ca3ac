"""Runs a test function on several CPU processes joined in one torch.distributed gloo group."""
import torch.distributed as dist
import torch.multiprocessing as mp


def _entry(rank, fn, world, init_file, args):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        fn(rank, *args)
    finally:
        dist.destroy_process_group()


def run_on_ranks(fn, world, tmp_path, *args):
    """Calls fn(rank, *args) in `world` spawned processes; they meet through a file in tmp_path (no ports)."""
    init_file = str(tmp_path / "gloo-rendezvous")
    mp.start_processes(_entry, args=(fn, world, init_file, args), nprocs=world, start_method="spawn")
