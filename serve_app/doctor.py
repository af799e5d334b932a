"""`genserve doctor CONFIG`: can this machine serve CONFIG? Each line is `ok`, `info`, or `FIX`
with what to do: torch and its CUDA build, the NVIDIA driver, the GPUs torch sees, each GPU
deployment's share of the card in GiB and the room left for CUDA contexts, the hub weights in the
cache, and the HTTP port. Exit status 1 when any line says FIX.

It checks the node it runs on: on a cluster, run it on each kind of GPU node.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass, field

from serve_app.config import AppArgs, app_args_from_config, load_serve_config

GIB = 1024**3
# Memory each process on a GPU holds outside torch's allocator (CUDA context, cuBLAS/cuDNN
# workspaces, kernels), which a per-process memory cap does not cover. An ESTIMATE: PyTorch's
# CUDA context is commonly published at roughly 0.3-1 GiB depending on the GPU, CUDA version and
# lazy module loading (CUDA_MODULE_LOADING=LAZY, the default since CUDA 11.7); not measured here
# (no GPU on the machines this was written on). The profiles leave at least this per replica.
CUDA_CONTEXT_GIB = 1.0


@dataclass
class Machine:
    """What this node has, as torch and nvidia-smi see it."""

    torch_version: str
    torch_cuda: str | None
    gpus: list[tuple[str, int]] = field(default_factory=list)  # (name, total memory in bytes), torch's view
    driver: str | None = None  # nvidia-smi's driver version; None: no nvidia-smi or it failed


def probe_machine() -> Machine:
    import torch

    gpus = []
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            gpus.append((props.name, props.total_memory))
    driver = None
    if shutil.which("nvidia-smi"):
        try:
            result = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                    capture_output=True, text=True, timeout=20)
            driver = result.stdout.strip().splitlines()[0] if result.returncode == 0 and result.stdout.strip() else None
        except (OSError, subprocess.TimeoutExpired):
            driver = None
    return Machine(torch.__version__, torch.version.cuda, gpus, driver)


class Report:
    def __init__(self, out=sys.stdout):
        self.out = out
        self.fixes = 0

    def ok(self, text: str) -> None:
        print(f"ok    {text}", file=self.out)

    def info(self, text: str) -> None:
        print(f"info  {text}", file=self.out)

    def fix(self, text: str) -> None:
        self.fixes += 1
        print(f"FIX   {text}", file=self.out)


def gpu_deployments(args: AppArgs) -> dict[str, tuple[float, str | None]]:
    """Deployment -> (share of a GPU per replica, accelerator type) for those that reserve a GPU."""
    return {name: (options.num_gpus, options.accelerator_type)
            for name, options in args.all_deployment_options().items() if options.num_gpus}


def check_torch(machine: Machine, needs_gpu: bool, report: Report) -> None:
    if machine.torch_cuda is None:
        text = f"torch {machine.torch_version} is a CPU-only build (torch.version.cuda is None)"
        if needs_gpu:
            report.fix(f"{text}: install a CUDA build of torch matching your driver (see docs/gpu.md)")
        else:
            report.ok(f"{text}; this config reserves no GPU")
        return
    report.ok(f"torch {machine.torch_version}, built for CUDA {machine.torch_cuda}")


def check_driver(machine: Machine, needs_gpu: bool, report: Report) -> None:
    if machine.driver is not None:
        report.ok(f"NVIDIA driver {machine.driver}")
    elif needs_gpu:
        report.fix("no NVIDIA driver found (nvidia-smi is missing or failed): install the driver, or in a container "
                   "run with the GPU mounted (docker --gpus all, or the NVIDIA device plugin on Kubernetes)")
    else:
        report.info("no NVIDIA driver (not needed: this config reserves no GPU)")


def check_gpus(machine: Machine, args: AppArgs, report: Report) -> None:
    wanted = gpu_deployments(args)
    if not wanted:
        report.ok("this config reserves no GPU")
        return
    if not machine.gpus:
        cause = ("torch is a CPU-only build" if machine.torch_cuda is None else
                 f"the driver is missing or older than CUDA {machine.torch_cuda} needs, or no GPU is mounted")
        report.fix(f"torch sees no CUDA device, but {len(wanted)} deployments reserve GPU shares "
                   f"({', '.join(f'{name} {share:g}' for name, (share, _) in wanted.items())}): {cause}")
        return
    names = sorted({name for name, _ in machine.gpus})
    report.ok(f"{len(machine.gpus)} GPU(s): " + ", ".join(f"{name} {total / GIB:.1f} GiB" for name, total in machine.gpus))
    here = [(name, share) for name, (share, kind) in wanted.items()
            if kind is None or any(kind.lower() in gpu.lower() for gpu in names)]
    elsewhere = [name for name, (_, kind) in wanted.items() if (name, wanted[name][0]) not in here]
    if elsewhere:
        report.info(f"not for this node's GPUs (accelerator_type): {', '.join(elsewhere)}")
    smallest = min(total for _, total in machine.gpus)
    if args.gpu is not None:  # a declared card: the memory plan, not the shares, says what fits (below)
        return
    for name, share in here:
        report.ok(f"{name}: {share:g} of the card = {share * smallest / GIB:.1f} GiB")
    check_headroom(args, names, smallest, report)


def packed_cards(args: AppArgs) -> list[tuple[str, list[tuple[str, float]]]]:
    """The GPUs `gpu_capacity` declares, each with the replicas (at max replicas) packed onto it,
    the way the config check packs them; one 'any' GPU when the config declares none."""
    from serve_app.config import pack_gpu_replicas

    replicas = [(name, options.num_gpus, options.accelerator_type)
                for name, options in args.all_deployment_options().items() if options.num_gpus
                for _ in range(options.max_replicas)]
    return pack_gpu_replicas(replicas, args.gpu_capacity or {"any": 1})[0]


def headroom_gib(cards: list[tuple[str, list[tuple[str, float]]]], memory: int) -> tuple[float, int] | None:
    """The least memory any card of `cards` keeps outside its shares, in GiB, and how many
    processes share that card; None when no card holds a fraction."""
    worst = None
    for _, held in cards:
        if not held or all(share >= 1 for _, share in held):
            continue
        left = (1 - sum(share for _, share in held)) * memory / GIB
        if worst is None or left / len(held) < worst[0] / worst[1]:
            worst = (left, len(held))
    return worst


def check_headroom(args: AppArgs, gpu_names: list[str], memory: int, report: Report) -> None:
    """Each card holding fractional shares must keep room for each of its processes' CUDA context,
    which the per-process memory cap does not count."""
    cards = [card for card in packed_cards(args)
             if card[0] == "any" or any(card[0].lower() in name.lower() for name in gpu_names)]
    worst = headroom_gib(cards, memory)
    if worst is None:
        return
    left, processes = worst
    text = (f"the fullest card keeps {left:.1f} GiB outside every share for {processes} processes' CUDA contexts "
            f"(~{CUDA_CONTEXT_GIB:g} GiB each, an estimate)")
    if left >= processes * CUDA_CONTEXT_GIB:
        report.ok(text)
    else:
        report.fix(f"{text}: lower the shares")


def check_weights(args: AppArgs, report: Report, config_path: str = "CONFIG") -> None:
    from serve_app.weights import is_cached, plan

    repos = plan(args)
    if not repos:
        report.ok("this config loads no weights from the hub")
        return
    missing = []
    for repo in repos:
        problem = is_cached(repo)
        if problem is None:
            report.ok(f"weights cached: {repo.source.source}")
        elif repo.optional:
            report.info(f"{problem} (an optional entry, not deployed)")
        else:
            missing.append(problem)
    for problem in missing:
        report.fix(f"{problem}: run `genserve download {config_path}`"
                   + (f" (HF_HUB_CACHE={os.environ['HF_HUB_CACHE']})" if os.environ.get("HF_HUB_CACHE") else ""))


def check_port(host: str, port: int, report: Report) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind(("0.0.0.0" if host in ("0.0.0.0", "") else host, port))
        except OSError as error:
            report.fix(f"HTTP port {host}:{port} is taken ({error.strerror}): stop what holds it or change "
                       "http_options.port")
            return
    report.ok(f"HTTP port {host}:{port} is free")


def card_of(machine: Machine, args: AppArgs, memory_gib: float | None):
    """The card to plan on: `memory_gib` where asked, else this node's smallest GPU, else the config's `gpu:`."""
    from deployments.config import GpuCard

    if memory_gib is not None:
        return GpuCard(name=f"{memory_gib:g} GiB card", memory_gib=memory_gib), True
    if machine.gpus:
        name, total = min(machine.gpus, key=lambda gpu: gpu[1])
        return GpuCard(name=name, memory_gib=total / GIB), True
    return args.gpu, False


def check_memory_plan(args: AppArgs, machine: Machine, report: Report, memory_gib: float | None = None) -> None:
    """A profile that declares its card (`gpu:`): its memory plan on this node's card (or the one asked)."""
    if args.gpu is None:
        return
    card, real = card_of(machine, args, memory_gib)
    plan = args.memory_plan(card)
    where = (f"the {card.name}" if memory_gib is not None else f"{card.name} ({card.memory_gib:.1f} GiB)" if real
             else f"the declared {card.name} ({card.memory_gib:g} GiB; no GPU here)")
    problems = plan.problems()
    if problems:
        for problem in problems:
            report.fix(f"memory plan on {where}: {problem}")
        return
    report.ok(f"memory plan on {where}: {plan.needed / GIB:.1f} GiB needed on the GPU at most, "
              f"{plan.host / GIB:.1f} GiB of weights in host RAM (docs/gpu.md)")


def shipped_profiles_that_fit(memory_gib: float) -> tuple[list[str], list[str]]:
    """(fitting, not fitting) shipped profiles that declare a card (`gpu:`), planned on `memory_gib`."""
    from pathlib import Path

    from deployments.config import GpuCard

    fitting, not_fitting = [], []
    for path in sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml")):
        try:
            args = app_args_from_config(path)
        except ValueError:  # not a genserve Serve config (grafana, prometheus) or not loadable here
            continue
        if args.gpu is None:
            continue
        plan = args.memory_plan(GpuCard(name=args.gpu.name, memory_gib=memory_gib))
        (not_fitting if plan.problems() else fitting).append(f"configs/{path.name}")
    return fitting, not_fitting


def check_shipped_profiles(args: AppArgs, machine: Machine, report: Report, memory_gib: float | None = None) -> None:
    card, real = card_of(machine, args, memory_gib)
    if card is None or not real:
        return
    fitting, _ = shipped_profiles_that_fit(card.memory_gib)
    if fitting:
        report.info(f"shipped profiles that fit {card.name} ({card.memory_gib:.1f} GiB): {', '.join(fitting)}")
    else:
        report.info(f"no shipped workstation profile fits {card.name} ({card.memory_gib:.1f} GiB)")


def workstation_plans() -> str:
    """The memory plan of each shipped profile that declares its card, as Markdown (docs/gpu.md holds it;
    `python -m serve_app.doctor` prints it, a unit test checks the docs are current)."""
    from pathlib import Path

    parts = []
    for path in sorted((Path(__file__).resolve().parents[1] / "configs").glob("workstation-*.yaml")):
        args = app_args_from_config(path)
        parts += [f"`configs/{path.name}` on {args.gpu.name} ({args.gpu.memory_gib:g} GiB):", "",
                  *args.memory_plan().rows(), ""]
    return "\n".join(parts)


def run_doctor(config_path: str, machine: Machine | None = None, out=sys.stdout, memory_gib: float | None = None) -> int:
    args = app_args_from_config(config_path)
    http = load_serve_config(config_path).get("http_options") or {}
    machine = machine or probe_machine()
    report = Report(out)
    needs_gpu = bool(gpu_deployments(args))
    check_torch(machine, needs_gpu, report)
    check_driver(machine, needs_gpu, report)
    check_gpus(machine, args, report)
    check_memory_plan(args, machine, report, memory_gib)
    check_shipped_profiles(args, machine, report, memory_gib)
    check_weights(args, report, str(config_path))
    check_port(http.get("host", "127.0.0.1"), int(http.get("port", 8000)), report)
    print(f"genserve doctor: {report.fixes} thing(s) to fix" if report.fixes else "genserve doctor: ready to serve",
          file=out)
    return 1 if report.fixes else 0


if __name__ == "__main__":
    print(workstation_plans())
