"""Training speed and memory of every dictionary kind against a dense TopK reference.

Run ``python -m evaluation.benchmarks.train`` (options: ``--steps``, ``--warmup``,
``--batch``, ``--d-in``, ``--d-sae``, ``--k``, ``--kinds``, ``--threads``, ``--json``).

Each measurement runs in its own process, so the peak resident memory (``ru_maxrss``)
belongs to one kind. Rows of the table:

- ``bound``: one dense encoder product (batch, d_in) @ (d_in, d_sae). A TopK step whose
  decoder and gradient products touch only the k active latents costs little more than
  this product, so ``batch / time`` is the speed limit of such a step.
- ``reference``: a plain dense PyTorch TopK SAE written here (dense scatter of the codes,
  dense decoder product, autograd everywhere), with the same initialisation, loss,
  unit-norm decoder upkeep and (fused) Adam as mmono's ``topk``.
- every mmono kind, stepped exactly as :func:`train_dictionary` steps it. ``ncl`` trains on
  ``batch / 2`` pairs, so every row processes ``batch`` embeddings per step.

Data: planted sparse codes, ``k`` active atoms per sample over a random unit dictionary of
``d_sae`` atoms, generated per step outside the timed region. After the timed steps, the
fraction of variance unexplained (FVU) on a held-out batch is reported. ``topk`` and
``reference`` take the same batches from the same initial weights, so their FVU should
agree.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

KINDS = ("topk", "batchtopk", "matryoshka", "relu", "ncl")


@dataclass(frozen=True)
class Setting:
    d_in: int = 512
    d_sae: int = 8192
    k: int = 32
    batch: int = 4096
    steps: int = 10
    warmup: int = 2
    lr: float = 4e-4
    seed: int = 0


# ---------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------


class PlantedData:
    """Batches of embeddings with ``k`` active atoms of a random unit dictionary."""

    def __init__(self, setting: Setting) -> None:
        self.setting = setting
        generator = torch.Generator().manual_seed(setting.seed + 1)
        atoms = torch.randn(setting.d_sae, setting.d_in, generator=generator)
        self.atoms = atoms / atoms.norm(dim=1, keepdim=True)

    def batch(self, index: int, n: int | None = None) -> torch.Tensor:
        """Raw embeddings of batch ``index``, shape (n, d_in)."""
        s = self.setting
        n = s.batch if n is None else n
        generator = torch.Generator().manual_seed(s.seed * 100_003 + index)
        active = torch.randint(0, s.d_sae, (n * s.k,), generator=generator)
        weights = 0.5 + torch.rand(n * s.k, generator=generator)
        z = F.embedding_bag(active, self.atoms, torch.arange(n) * s.k, mode="sum", per_sample_weights=weights)
        return z + 0.05 * torch.randn(n, s.d_in, generator=generator)


# ---------------------------------------------------------------------------
# Dense reference
# ---------------------------------------------------------------------------


class DenseTopKSAE(nn.Module):
    """A plain TopK SAE: dense codes, dense products, autograd for every gradient."""

    def __init__(self, W_enc: torch.Tensor, b_enc: torch.Tensor, W_dec: torch.Tensor, b_dec: torch.Tensor, k: int) -> None:
        super().__init__()
        self.W_enc = nn.Parameter(W_enc.clone())
        self.b_enc = nn.Parameter(b_enc.clone())
        self.W_dec = nn.Parameter(W_dec.clone())
        self.b_dec = nn.Parameter(b_dec.clone())
        self.k = k

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pre = (z - self.b_dec) @ self.W_enc.t() + self.b_enc
        top = pre.topk(self.k, dim=1)
        latents = torch.zeros_like(pre).scatter(1, top.indices, F.relu(top.values))
        return latents @ self.W_dec + self.b_dec, latents

    def step(self, z: torch.Tensor, optimizer: torch.optim.Optimizer) -> float:
        z_hat, _ = self(z)
        loss = (z - z_hat).pow(2).sum(dim=1).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        with torch.no_grad():
            rows = self.W_dec / self.W_dec.norm(dim=1, keepdim=True)
            self.W_dec.grad -= (self.W_dec.grad * rows).sum(dim=1, keepdim=True) * rows
        optimizer.step()
        with torch.no_grad():
            self.W_dec /= self.W_dec.norm(dim=1, keepdim=True)
        return float(loss)


# ---------------------------------------------------------------------------
# One measurement per process
# ---------------------------------------------------------------------------


def _peak_rss_mb() -> float:
    # ru_maxrss is in kilobytes on Linux.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _fvu(z: torch.Tensor, z_hat: torch.Tensor) -> float:
    return float((z - z_hat).pow(2).sum() / (z - z.mean(dim=0)).pow(2).sum())


def _time_bound(setting: Setting) -> dict:
    generator = torch.Generator().manual_seed(setting.seed)
    x = torch.randn(setting.batch, setting.d_in, generator=generator)
    weight = torch.randn(setting.d_sae, setting.d_in, generator=generator)
    bias = torch.zeros(setting.d_sae)
    rss_before = _peak_rss_mb()
    times = []
    for index in range(setting.warmup + setting.steps):
        start = time.perf_counter()
        torch.addmm(bias, x, weight.t())
        if index >= setting.warmup:
            times.append(time.perf_counter() - start)
    return {"seconds": times, "rss_before_mb": rss_before, "peak_rss_mb": _peak_rss_mb()}


def _make_dictionary(kind: str, setting: Setting):
    from mmono_features.dictionary import get_dictionary_class, make_config

    options = {"k": setting.k} if kind in ("topk", "batchtopk", "matryoshka") else {}
    config = make_config(kind, setting.d_in, setting.d_sae, seed=setting.seed, **options)
    return get_dictionary_class(kind)(config)


def _run_kind(kind: str, setting: Setting) -> dict:
    from mmono_features.dictionary.train import TrainConfig, _optimizer_step, make_optimizer

    data = PlantedData(setting)
    held_out = data.batch(10_000_000)
    dictionary = _make_dictionary(kind if kind != "reference" else "topk", setting)
    paired = bool(getattr(dictionary, "paired_training", False))
    if not paired:
        dictionary.initialize_from_data(dictionary.prepare(data.batch(-1), "image"))
    device = torch.device("cpu")
    train_config = TrainConfig(lr=setting.lr, batch_size=setting.batch, warmup_steps=0, lr_decay_fraction=0.0, device="cpu")
    reference = None
    if kind == "reference":
        reference = DenseTopKSAE(dictionary.W_enc.data, dictionary.b_enc.data, dictionary.W_dec.data, dictionary.b_dec.data, setting.k)
        del dictionary
        module = reference
    else:
        module = dictionary
    # The same (fused) Adam for every row, so the rows differ only in the forward/backward.
    optimizer = make_optimizer(module, train_config, device)
    dead = torch.zeros(setting.d_sae, dtype=torch.bool)
    rss_before = _peak_rss_mb()
    times = []
    for index in range(setting.warmup + setting.steps):
        raw = data.batch(index)
        if reference is not None:
            start = time.perf_counter()
            reference.step(dictionary_prepare(raw), optimizer)
        elif paired:
            half = setting.batch // 2
            noise = torch.Generator().manual_seed(index)
            batch = (raw[:half], raw[:half] + 0.05 * torch.randn(half, setting.d_in, generator=noise))
            start = time.perf_counter()
            _optimizer_step(module, optimizer, batch, index, dead, train_config, device)
        else:
            batch = (raw, torch.arange(raw.shape[0]) % 2)
            start = time.perf_counter()
            _optimizer_step(module, optimizer, batch, index, dead, train_config, device)
        if index >= setting.warmup:
            times.append(time.perf_counter() - start)
    peak = _peak_rss_mb()
    with torch.no_grad():
        z = dictionary_prepare(held_out)
        if paired:
            module.fit_decoder([(dictionary_prepare(data.batch(-2)), "image")])
        z_hat, _ = module(z)
    return {"seconds": times, "rss_before_mb": rss_before, "peak_rss_mb": peak, "fvu": _fvu(z, z_hat)}


def dictionary_prepare(raw: torch.Tensor) -> torch.Tensor:
    """Normalise raw embeddings as every dictionary does without centring."""
    from mmono_features.embeddings import normalize_embeddings

    return normalize_embeddings(raw)


def _child(name: str, setting: Setting) -> dict:
    torch.manual_seed(setting.seed)
    from mmono_features.progress import set_progress

    set_progress(False)
    result = _time_bound(setting) if name == "bound" else _run_kind(name, setting)
    result["name"] = name
    result["threads"] = torch.get_num_threads()
    return result


# ---------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else 0.5 * (ordered[middle - 1] + ordered[middle])


def _run_child(name: str, args: argparse.Namespace) -> dict:
    command = [sys.executable, "-m", "evaluation.benchmarks.train", "--child", name] + _forwarded(args)
    completed = subprocess.run(command, capture_output=True, text=True, check=False)
    if completed.returncode != 0:
        raise RuntimeError(f"benchmark of {name!r} failed:\n{completed.stderr[-4000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def _forwarded(args: argparse.Namespace) -> list[str]:
    forwarded = [
        "--steps", str(args.steps), "--warmup", str(args.warmup), "--batch", str(args.batch),
        "--d-in", str(args.d_in), "--d-sae", str(args.d_sae), "--k", str(args.k), "--lr", str(args.lr),
    ]
    if args.threads:
        forwarded += ["--threads", str(args.threads)]
    return forwarded


def _table(results: list[dict], setting: Setting) -> str:
    by_name = {result["name"]: result for result in results}
    bound = by_name.get("bound")
    reference = by_name.get("reference")
    bound_rate = setting.batch / _median(bound["seconds"]) if bound else None
    reference_rate = setting.batch / _median(reference["seconds"]) if reference else None
    header = f"{'row':<11} {'step ms':>9} {'samples/s':>10} {'vs ref':>7} {'vs bound':>9} {'peak RSS MB':>12} {'+train MB':>10} {'FVU':>8}"
    lines = [header, "-" * len(header)]
    for result in results:
        seconds = _median(result["seconds"])
        rate = setting.batch / seconds
        vs_reference = f"{rate / reference_rate:.2f}" if reference_rate else "-"
        vs_bound = f"{rate / bound_rate:.2f}" if bound_rate else "-"
        fvu = f"{result['fvu']:.4f}" if "fvu" in result else "-"
        growth = result["peak_rss_mb"] - result["rss_before_mb"]
        lines.append(
            f"{result['name']:<11} {seconds * 1000:>9.1f} {rate:>10.0f} {vs_reference:>7} {vs_bound:>9} "
            f"{result['peak_rss_mb']:>12.0f} {growth:>10.0f} {fvu:>8}"
        )
    return "\n".join(lines)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10, help="timed steps per row (median reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps before the timed ones")
    parser.add_argument("--batch", type=int, default=4096, help="embeddings per step")
    parser.add_argument("--d-in", dest="d_in", type=int, default=512)
    parser.add_argument("--d-sae", dest="d_sae", type=int, default=8192)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--lr", type=float, default=4e-4)
    parser.add_argument("--kinds", default=",".join(KINDS), help=f"comma-separated subset of {','.join(KINDS)}")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--json", default=None, help="also write the raw measurements to this file")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    kinds = [kind for kind in args.kinds.split(",") if kind]
    unknown = sorted(set(kinds) - set(KINDS))
    if unknown:
        parser.error(f"unknown kinds {unknown}; choose from {list(KINDS)}")
    if args.steps < 1 or args.warmup < 0 or args.batch < 2:
        parser.error("--steps must be >= 1, --warmup >= 0 and --batch >= 2")
    args.kinds = kinds
    return args


def main(argv: list[str] | None = None) -> None:
    args = _parse(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    setting = Setting(d_in=args.d_in, d_sae=args.d_sae, k=args.k, batch=args.batch, steps=args.steps, warmup=args.warmup, lr=args.lr)
    if args.child:
        print(json.dumps(_child(args.child, setting)))
        return

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"dictionary training benchmark: d_in={setting.d_in} d_sae={setting.d_sae} k={setting.k} batch={setting.batch}, "
        f"{setting.steps} timed steps after {setting.warmup} warm-up, torch {torch.__version__}, "
        f"{args.threads or torch.get_num_threads()} threads, {os.cpu_count()} CPUs, load average {load:.1f}",
        flush=True,
    )

    results = []
    for name in ["bound", "reference", *args.kinds]:
        start = time.perf_counter()
        results.append(_run_child(name, args))
        print(f"  {name}: done in {time.perf_counter() - start:.0f} s", flush=True)
    print(_table(results, setting))

    by_name = {result["name"]: result for result in results}
    if "topk" in by_name:
        topk, reference, bound = by_name["topk"], by_name["reference"], by_name["bound"]
        print(
            f"topk: {_median(bound['seconds']) / _median(topk['seconds']):.2f} of the bound, "
            f"{_median(reference['seconds']) / _median(topk['seconds']):.2f}x the dense reference; "
            f"FVU after {setting.warmup + setting.steps} steps {topk['fvu']:.4f} (reference {reference['fvu']:.4f})"
        )
    print(f"load average after the run: {os.getloadavg()[0]:.1f}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump({"setting": setting.__dict__, "results": results}, handle, indent=1)


if __name__ == "__main__":
    main()
