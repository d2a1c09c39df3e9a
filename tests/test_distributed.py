"""Codebook synchronisation under torch.distributed: two gloo processes on the CPU.

The workers run as separate ``python`` processes (this module is imported by them: see ``_worker``), connected over
tcp://127.0.0.1 with a free port. Every wait has a timeout so that a hang fails the test instead of blocking CI.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

WORLD = 2
STEPS = 10
TIMEOUT = 240  # seconds for a whole two-process run
SYNCED_BUFFERS = ("codebook", "ema_count", "ema_sum", "last_used", "steps", "initialized")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_env() -> dict:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def run_processes(cmds: list[list[str]], cwd: Path, timeout: float = TIMEOUT) -> list[subprocess.CompletedProcess]:
    """Start all commands, wait for all with one overall timeout, kill everything on a timeout."""
    procs = [subprocess.Popen(c, cwd=cwd, env=worker_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for c in cmds]
    outputs = []
    deadline = time.monotonic() + timeout
    try:
        for p in procs:
            out, _ = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
            outputs.append(subprocess.CompletedProcess(p.args, p.returncode, out, None))
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        logs = "\n".join((p.communicate()[0] or "")[-3000:] for p in procs)
        pytest.fail(f"distributed run did not finish within {timeout} s (hang?)\n{logs}")
    return outputs


# ------------------------------------------------------------------------------------------------ the worker


class TinyNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        from vqkit.quantizers import VectorQuantizer

        self.enc = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.quantize = VectorQuantizer(4, 32, use_ema=True, ema_decay=0.9, kmeans_init=True, dead_code_window=2)
        self.dec = torch.nn.Conv2d(4, 3, 3, padding=1)

    def forward(self, x):
        q = self.quantize(self.enc(x))
        self.last_stats = q.stats
        return self.dec(q.quantized), q.loss


def _train(rank: int, sync: bool) -> dict:
    import vqkit.distributed as D

    saved = {name: getattr(D, name) for name in ("all_reduce_sum", "broadcast", "all_gather_cat", "is_main_process")}
    if not sync:  # every rank behaves as if it were alone: the control experiment
        D.all_reduce_sum = lambda t: t
        D.broadcast = lambda t, src=0: t
        D.all_gather_cat = lambda t: t
        D.is_main_process = lambda: True
    try:
        torch.manual_seed(0)  # identical initial weights on both ranks
        net = TinyNet()
        ddp = torch.nn.parallel.DistributedDataParallel(net, broadcast_buffers=False)
        opt = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=1e-2)
        g = torch.Generator().manual_seed(1000 + rank)  # different data on each rank
        restarted, data_sum = 0.0, 0.0
        for step in range(STEPS):
            shift = 0.0 if step < 4 else 4.0  # the data moves: codes are left behind and must be restarted
            x = torch.randn(4, 3, 8, 8, generator=g) * (1 + rank) + rank + shift
            data_sum += float(x.sum())
            rec, qloss = ddp(x)
            loss = torch.nn.functional.mse_loss(rec, x) + qloss
            opt.zero_grad()
            loss.backward()
            opt.step()
            restarted += net.last_stats["restarted"]
        state = {k: getattr(net.quantize, k).detach().clone() for k in SYNCED_BUFFERS}
        state["enc.weight"] = net.enc.weight.detach().clone()
        state["restarted"] = torch.tensor(restarted)
        state["data_sum"] = torch.tensor(data_sum)
        return state
    finally:
        for name, fn in saved.items():
            setattr(D, name, fn)


def _worker(rank: int, port: int, out_dir: str) -> None:
    import datetime

    import torch.distributed as dist
    from safetensors.torch import save_file

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=120))
    try:
        import vqkit.distributed as D

        assert D.is_distributed() and D.world_size() == WORLD and D.rank() == rank
        for sync in (True, False):
            state = _train(rank, sync)
            save_file({k: v.contiguous() for k, v in state.items()},
                      str(Path(out_dir) / f"{'sync' if sync else 'nosync'}_{rank}.safetensors"))
            dist.barrier()
    finally:
        dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------------- tests


@pytest.fixture(scope="module")
def two_rank_states(tmp_path_factory):
    from safetensors.torch import load_file

    out = tmp_path_factory.mktemp("ddp")
    port = free_port()
    here = str(Path(__file__).resolve().parent)
    code = (f"import sys; sys.path.insert(0, {here!r}); import test_distributed as t; "
            f"t._worker(int(sys.argv[1]), {port}, {str(out)!r})")
    results = run_processes([[sys.executable, "-c", code, str(r)] for r in range(WORLD)], cwd=out)
    for r, res in enumerate(results):
        assert res.returncode == 0, f"rank {r} failed:\n{res.stdout[-5000:]}"
    return {(mode, r): load_file(str(out / f"{mode}_{r}.safetensors")) for mode in ("sync", "nosync")
            for r in range(WORLD)}


def test_codebooks_stay_identical_across_ranks(two_rank_states):
    a, b = two_rank_states[("sync", 0)], two_rank_states[("sync", 1)]
    assert not torch.equal(a["data_sum"], b["data_sum"])  # the ranks really saw different data
    for key in SYNCED_BUFFERS + ("enc.weight",):
        assert torch.equal(a[key], b[key]), f"{key} differs between ranks"
    # the synchronised paths were exercised: k-means init ran, EMA moved the codes, dead codes were restarted
    assert int(a["initialized"]) == 1 and int(a["steps"]) == STEPS
    assert float(a["restarted"]) > 0 and float(a["restarted"]) == float(b["restarted"])
    assert (a["ema_count"] != 1).any()
    assert a["codebook"].abs().max() > 0.1  # not the ~1/K random init


def test_without_synchronisation_the_codebooks_diverge(two_rank_states):
    a, b = two_rank_states[("nosync", 0)], two_rank_states[("nosync", 1)]
    assert int(a["initialized"]) == int(b["initialized"]) == 1
    assert not torch.equal(a["codebook"], b["codebook"])
    assert not torch.equal(a["ema_sum"], b["ema_sum"])
    assert not torch.equal(a["ema_count"], b["ema_count"])


def test_torchrun_end_to_end(tmp_path):
    from vqkit import VQModel

    out = tmp_path / "ddp_run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(WORLD),
           "-m", "vqkit.cli", "train", "tokenizer", "--data", "mnist5k", "--out", str(out), "steps=4",
           "model.base_channels=8", "model.channel_mult=[1,2]", "model.z_channels=8", "model.embed_dim=8",
           "model.mid_attention=false", "model.codebook_size=32", "model.dead_code_window=1", "batch_size=16",
           "optim.warmup_steps=1", "image_every=0", "log_every=1", "ckpt_every=2", "eval_batch_size=500"]
    (res,) = run_processes([cmd], cwd=tmp_path)
    assert res.returncode == 0, res.stdout[-5000:]
    model = VQModel.from_pretrained(out)
    assert model.config.codebook_size == 32
    assert (out / "eval.json").is_file()
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [int(line.split('"step": ')[1].split(",")[0]) for line in lines] == [1, 2, 3, 4]  # one writer only
    assert "2 process(es)" in res.stdout


def _first_worker(rank: int, port: int, out_dir: str) -> None:
    """main_process_first twice: a build that logs its rank (rank 0 slow), then one that fails on rank 0."""
    import datetime

    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=120))
    try:
        import vqkit.distributed as D

        log = Path(out_dir) / "built.txt"

        def build():
            if rank == 0:
                time.sleep(1.0)  # a slow first build: the other rank must still come after it
            with open(log, "a") as f:
                f.write(f"{rank}\n")
            return rank

        assert D.main_process_first(build) == rank

        def broken():
            if rank == 0:
                raise ValueError("no weights")
            with open(log, "a") as f:
                f.write(f"broken {rank}\n")

        try:
            D.main_process_first(broken)
            outcome = "returned"
        except Exception as e:  # the other ranks must not wait forever for rank 0
            outcome = type(e).__name__
        (Path(out_dir) / f"outcome_{rank}.txt").write_text(outcome)
    finally:
        dist.destroy_process_group()


def test_main_process_first_builds_on_rank0_before_the_others_and_shares_its_failure(tmp_path):
    port = free_port()
    here = str(Path(__file__).resolve().parent)
    code = (f"import sys; sys.path.insert(0, {here!r}); import test_distributed as t; "
            f"t._first_worker(int(sys.argv[1]), {port}, {str(tmp_path)!r})")
    results = run_processes([[sys.executable, "-c", code, str(r)] for r in range(WORLD)], cwd=tmp_path, timeout=120)
    for r, res in enumerate(results):
        assert res.returncode == 0, f"rank {r} failed:\n{res.stdout[-5000:]}"
    assert (tmp_path / "built.txt").read_text().split("\n")[:-1] == ["0", "1"]  # rank 1 built after rank 0, once each
    assert (tmp_path / "outcome_0.txt").read_text() == "ValueError"  # rank 0 keeps its own error
    assert (tmp_path / "outcome_1.txt").read_text() == "RuntimeError"  # the others fail too, without building


def test_main_process_first_in_one_process_just_builds():
    from vqkit.distributed import main_process_first

    assert main_process_first(lambda: 7) == 7
