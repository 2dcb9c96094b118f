"""``make gpu-check``: fabric_ckpt on a CUDA device, in one short run (well under 5 minutes; skipped without CUDA).

Checks, each an assertion (the run fails loudly), then figures:

1. save and load of a CUDA model and optimizer are bitwise exact, and the load goes straight into the live CUDA
   parameters and optimizer state (same tensors, same device memory);
2. asynchronous saves stage into pinned host memory, reused across saves (same addresses);
3. a lazy snapshot is the state at the call even though an optimizer step follows at once (the step waits);
4. figures: one device-to-host copy of the state into pinned memory (the floor of any snapshot), the time
   ``save_async`` blocks the caller (eager and lazy), until complete, a synchronous save and a warm load.

``--device cpu`` runs the same checks on the CPU (pinned memory is then not checked): the test suite uses it so the
script cannot rot on machines without a GPU.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from benchmarks.workloads import GPT, config_for_size
from fabric_ckpt import Fabric

__all__ = ["main", "run_checks"]


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], Any], device: torch.device, reps: int = 3) -> dict[str, float]:
    seconds = []
    for _ in range(reps):
        _synchronize(device)
        started = time.perf_counter()
        fn()
        _synchronize(device)
        seconds.append(time.perf_counter() - started)
    return {"median": statistics.median(seconds), "min": min(seconds), "max": max(seconds)}


def _build(fabric: Fabric, size_gib: float, seed: int) -> tuple[Any, Any, torch.Tensor]:
    torch.manual_seed(seed)
    config = config_for_size(size_gib)
    with fabric.init_module():
        module = GPT(config)
    model, optimizer = fabric.setup(module, torch.optim.Adam(module.parameters(), lr=1e-4))
    tokens = torch.randint(config.vocab, (2, min(32, config.block)), device=fabric.device)
    _step(model, optimizer, tokens)
    return model, optimizer, tokens


def _step(model: Any, optimizer: Any, tokens: torch.Tensor) -> None:
    logits = model(tokens[:, :-1])
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def _tensors(model: Any, optimizer: Any) -> list[torch.Tensor]:
    tensors = list(model.state_dict().values())
    return tensors + [v for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    pairs = zip(a, b, strict=False)
    return len(a) == len(b) and all(x.dtype == y.dtype and torch.equal(x, y.to(x.device)) for x, y in pairs)


def run_checks(device_name: str = "cuda", size_gib: float = 1.0, folder: str | None = None) -> dict[str, Any]:
    """Run every check on ``device_name``; return the figures. Raises ``AssertionError`` if a check fails."""
    device = torch.device(device_name)
    fabric = Fabric(accelerator=device.type)
    results: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "size_gib": size_gib,
    }
    with tempfile.TemporaryDirectory(dir=folder) as scratch:
        root = Path(scratch)
        model, optimizer, tokens = _build(fabric, size_gib, seed=0)
        state = {"model": model, "optimizer": optimizer}
        payload = sum(t.numel() * t.element_size() for t in _tensors(model, optimizer))
        results["payload_bytes"] = payload

        # 1. bitwise round trip, straight into the live CUDA tensors
        fabric.save(root / "sync.ckpt", state)
        expected = [t.clone() for t in _tensors(model, optimizer)]
        target_model, target_optimizer, _ = _build(fabric, size_gib, seed=1)
        before = [t.data_ptr() for t in _tensors(target_model, target_optimizer)]
        fabric.load(root / "sync.ckpt", {"model": target_model, "optimizer": target_optimizer})
        loaded = _tensors(target_model, target_optimizer)
        assert _same(expected, loaded), "a CUDA save/load round trip is not bitwise exact"
        assert all(t.device.type == device.type for t in loaded), "loaded state left the device"
        assert [t.data_ptr() for t in loaded] == before, "the load replaced live tensors instead of copying into them"
        results["round_trip_bitwise"] = True

        # 2. pinned staging, reused across saves
        fabric.save_async(root / "a.ckpt", state).wait()
        pool = fabric._background.stager._pool
        addresses = [s.data_ptr() for s in pool]
        fabric.save_async(root / "b.ckpt", state).wait()
        assert [s.data_ptr() for s in fabric._background.stager._pool] == addresses, "staging was not reused"
        if device.type == "cuda":
            assert all(s.is_pinned() for s in pool), "staging memory for CUDA tensors is not pinned"
        results["staging_reused"] = True
        results["staging_pinned"] = device.type == "cuda"

        # 3. a lazy snapshot followed at once by a step is the state at the call
        expected = [t.clone() for t in _tensors(model, optimizer)]
        handle = fabric.save_async(root / "lazy.ckpt", state, snapshot="lazy")
        _step(model, optimizer, tokens)  # waits for the copies before changing anything
        handle.wait()
        check_model, check_optimizer, _ = _build(fabric, size_gib, seed=2)
        fabric.load(root / "lazy.ckpt", {"model": check_model, "optimizer": check_optimizer})
        assert _same(expected, _tensors(check_model, check_optimizer)), "a lazy snapshot is not the state at the call"
        results["lazy_exact"] = True

        # 4. figures
        sources = _tensors(model, optimizer)
        pinned = device.type == "cuda"
        host = [torch.empty(t.shape, dtype=t.dtype, pin_memory=pinned) for t in sources]

        def device_to_host() -> None:
            for target, source in zip(host, sources, strict=True):
                target.copy_(source, non_blocking=pinned)

        counter = iter(range(1000))

        def save_async(snapshot: str, wait: bool) -> Callable[[], None]:
            def run() -> None:
                fabric.wait_for_saves()  # the previous save is not charged to this one
                handle = fabric.save_async(root / f"f{next(counter)}.ckpt", state, snapshot=snapshot)
                if wait:
                    handle.wait()

            return run

        results["one_copy_to_host_s"] = _timed(device_to_host, device)
        results["eager_blocked_s"] = _blocked(fabric, save_async("eager", wait=False), device)
        results["eager_until_complete_s"] = _timed(save_async("eager", wait=True), device)
        results["lazy_blocked_s"] = _blocked(fabric, save_async("lazy", wait=False), device)
        results["lazy_until_complete_s"] = _timed(save_async("lazy", wait=True), device)
        results["sync_save_s"] = _timed(lambda: fabric.save(root / "sync.ckpt", state), device)
        results["warm_load_s"] = _timed(lambda: fabric.load(root / "sync.ckpt", state), device)
        fabric.wait_for_saves()
    copy_s = results["one_copy_to_host_s"]["median"]
    results["eager_blocked_vs_one_copy"] = results["eager_blocked_s"]["median"] / copy_s
    results["lazy_blocked_pct_of_one_copy"] = 100 * results["lazy_blocked_s"]["median"] / copy_s
    return results


def _blocked(fabric: Fabric, run: Callable[[], None], device: torch.device) -> dict[str, float]:
    seconds = []
    for _ in range(3):
        fabric.wait_for_saves()
        _synchronize(device)
        started = time.perf_counter()
        run()
        seconds.append(time.perf_counter() - started)
    fabric.wait_for_saves()
    return {"median": statistics.median(seconds), "min": min(seconds), "max": max(seconds)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__)
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (the same checks, for tests)")
    parser.add_argument("--size-gib", type=float, default=1.0, help="checkpoint size (model + Adam)")
    parser.add_argument("--output", default=None, help="write the figures here as JSON")
    parser.add_argument("--workdir", default=None, help="folder for the checkpoints (default: the temp folder)")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu-check: skipped, no CUDA device is available")
        return 0
    results = run_checks(args.device, args.size_gib, args.workdir)
    text = json.dumps(results, indent=1)
    print(text)
    if args.output:
        Path(args.output).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
