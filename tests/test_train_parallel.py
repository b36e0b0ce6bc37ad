"""Two CPU processes (gloo): DeepSpeed ZeRO-2 / ZeRO-3 save -> resume -> export with the recipe's
cosine really applied, and a two-node launch simulated on one machine."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from models.manifest import read_manifest
from tests.test_train_world import (
    REPO,
    TINY,
    free_port,
    make_world,
    read_losses,
    run_train,
    subprocess_env,
    torchrun_cmd,
    world_overrides,
)

pytestmark = pytest.mark.slow
COMMON = [
    "train.steps=6",
    "train.micro_batch=2",
    "train.grad_accum=2",
    "log.every=1",
    "checkpoint.every=2",
    "schedule.warmup_steps=1",
    "freeze.llm=train",
]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_world(tmp_path_factory.mktemp("world"))


@pytest.mark.parametrize("mode", ["zero2", "zero3"])
def test_zero_save_resume_export_on_two_processes(world, tmp_path, mode):
    run = tmp_path / mode
    args = [str(TINY / "pretrain.yaml"), *world_overrides(world, run), *COMMON, f"parallel.mode={mode}"]
    run_train(args + ["train.stop_after_steps=4"], nproc=2)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_000002", "step_000004"]
    assert not (run / "final").exists()
    # The manifest covers DeepSpeed's own files (resume reads them only when they match), both ranks' states.
    listed = read_manifest(run / "checkpoints" / "step_000004")
    assert any(name.startswith("deepspeed/state/") and name.endswith(".pt") for name in listed)
    assert {"rank_00000.pt", "rank_00001.pt", "trainer_state.json"} <= set(listed)
    proc = run_train(args + ["train.resume=auto"], nproc=2)
    assert "resumed from" in proc.stdout and "step_000004" in proc.stdout

    lrs = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        lrs[rec["step"]] = rec["lr"]
    # Cosine under DeepSpeed: after the 1 warmup step the lr strictly decreases to min_lr (Qwen-VL#183).
    assert [lrs[s] for s in range(1, 7)] == sorted(lrs.values(), reverse=True)
    assert lrs[2] > lrs[4] > lrs[6] and lrs[6] == pytest.approx(1e-5)
    assert all(torch.isfinite(torch.tensor(v)) for v in read_losses(run).values())

    from models import load_vlm

    model = load_vlm(run / "final")  # gathered full weights (ZeRO-3: from the shards)
    assert json.loads((run / "final" / "generation_config.json").read_text())["chat_format"] == "raw"
    ids = torch.tensor([[5, 6, 7, 8]])
    assert torch.isfinite(model(ids).logits).all()
    (tmp_path.parent / f"export_{mode}.pt").write_bytes(b"")  # marker for the comparison below
    torch.save(model.state_dict(), tmp_path.parent / f"export_{mode}.pt")


def test_zero2_and_zero3_exports_agree(tmp_path):
    """Both parametrisations above trained the same recipe; their exports hold the same weights."""
    files = sorted(tmp_path.parent.parent.glob("*/export_zero*.pt"))
    if len(files) < 2:
        pytest.skip("needs both ZeRO runs of this session")
    a, b = (torch.load(f, weights_only=True) for f in files[-2:])
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)


def test_two_node_launch_simulated_on_one_machine(world, tmp_path):
    """Two torchrun invocations (--nnodes 2, node ranks 0 and 1) rendezvous over 127.0.0.1 and train."""
    run = tmp_path / "two_nodes"
    port = free_port()
    args = [
        str(TINY / "pretrain.yaml"),
        *world_overrides(world, run),
        "train.steps=3",
        "train.micro_batch=2",
        "log.every=1",
        "parallel.mode=ddp",
    ]
    procs = [
        subprocess.Popen(
            torchrun_cmd(1, *args, nnodes=2, node_rank=r, port=port),
            cwd=REPO,
            env=subprocess_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in (0, 1)
    ]
    outs = [p.communicate(timeout=240)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-3000:] for o in outs)
    assert "mode ddp, world size 2" in outs[0]
    assert sorted(read_losses(run)) == [1, 2, 3]
    assert (run / "final" / "model.safetensors").is_file()


def test_zero3_module_hooks_see_the_tensors_inside_the_model_output():
    """ZeRO-3 re-gathers parameters for backward through hooks on a module's output tensors; it finds
    them only inside tuples, lists and dicts, so VLMOutput must be a dict (a transformers ModelOutput)."""
    script = (
        "import sys, torch\n"
        "from deepspeed.runtime.zero.utils import apply_to_tensors_only\n"
        "from models.vlm import VLMOutput\n"
        "out = VLMOutput(loss_sum=torch.ones(()), num_tokens=torch.ones((), dtype=torch.long))\n"
        "seen = []\n"
        "apply_to_tensors_only(lambda t: seen.append(t) or t, out)\n"
        "sys.exit(0 if len(seen) == 2 else 1)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], env=subprocess_env(), capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-2000:]


def test_a_finished_run_leaves_its_process_group(tmp_path):
    """python -m train ends with train.parallel.shutdown_distributed: the group is destroyed, not left to the
    interpreter's exit (where a loaded gloo rank aborted after a successful run)."""
    import torch.distributed as dist

    from train.parallel import shutdown_distributed

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    assert dist.is_initialized()
    shutdown_distributed()
    assert not dist.is_initialized()
    shutdown_distributed()  # a single process without a group: nothing to do


def test_ddp_asked_for_on_one_process_runs_as_a_single_process():
    """parallel.mode: ddp without torchrun (one process) must not ask for a process group nobody started."""
    from train.parallel import resolve_mode
    from train.recipe import ParallelSection

    assert resolve_mode(ParallelSection(mode="ddp"), world_size=1) == "single"
    assert resolve_mode(ParallelSection(mode="ddp"), world_size=2) == "ddp"
    assert resolve_mode(ParallelSection(mode="zero2"), world_size=1) == "zero2"
