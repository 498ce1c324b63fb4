"""``fastvae train``: train an autoencoder or a VAE, resumably, on one device or under torchrun.

    fastvae train --data digits --model vae --arch mlp --epochs 50 --out runs/x
    torchrun --nproc_per_node 2 -m fastvae train ...      # data-parallel (DDP)

Determinism: ``--seed`` fixes the initial weights, the data order (a permutation
drawn per epoch from (seed, epoch)) and the reparameterization noise (one
generator per process, saved in every checkpoint). A run resumed from its
epoch-k checkpoint therefore continues bit for bit like the uninterrupted run.
"""

import contextlib
import math
import os
import sys
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist
from tqdm import tqdm

from fastvae import _validate
from fastvae.app import checkpoint
from fastvae.app.data import check_range, load_data
from fastvae.models import BY_KIND

ANNEALING = ("none", "linear", "cyclical")


@dataclass
class TrainConfig:
    epochs: int = 50
    batch_size: int = 64
    lr: float = 1e-3
    beta: float = 1.0
    anneal: str = "none"       # KL weight schedule: none, linear warm-up, cyclical
    anneal_epochs: float = 10  # linear: epochs to ramp beta from 0
    cycles: int = 4            # cyclical: ramps over the run (each ramps over half its cycle)
    free_bits: float = 0.0     # nats per latent dimension not penalised
    seed: int = 0
    amp: str = "auto"          # bf16 autocast: auto = on CUDA
    save_every: int = 1        # epochs between checkpoints

    def __post_init__(self):
        _validate.check_choice("anneal", self.anneal, ANNEALING)
        _validate.check_choice("amp", self.amp, ("auto", "on", "off"))
        for name in ("epochs", "batch_size", "cycles", "save_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("lr", "anneal_epochs"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if not (math.isfinite(self.beta) and self.beta >= 0 and self.free_bits >= 0):
            raise ValueError(f"beta and free_bits must be finite and >= 0, got "
                             f"{self.beta} and {self.free_bits}")


def beta_at(cfg, epoch_progress):
    """KL weight after ``epoch_progress`` epochs (a float) under the schedule.
    cyclical: Fu et al. 2019 -- each of ``cycles`` cycles ramps 0 -> beta over its
    first half, then holds beta."""
    if cfg.anneal == "linear":
        return cfg.beta * min(1.0, epoch_progress / cfg.anneal_epochs)
    if cfg.anneal == "cyclical":
        period = cfg.epochs / cfg.cycles
        return cfg.beta * min(1.0, 2.0 * (epoch_progress % period) / period)
    return cfg.beta


def _world():
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


@torch.no_grad()
def evaluate(model, x, batch_size=1024):
    """Mean per-sample score (loss at z = mu) over ``x``: deterministic, no RNG used."""
    model.eval()
    total = sum(model.score(x[i:i + batch_size]).sum() for i in range(0, len(x), batch_size))
    model.train()
    return (total / len(x)).item()


def check_resume(path, model):
    """Load a checkpoint to resume from, refusing one of another architecture."""
    config, tensors = checkpoint.load(path)
    if config["model"] != model.config():
        raise ValueError(f"--resume {path}: the checkpoint holds {config['model']} but this "
                         f"command builds {model.config()}; pass the same model options")
    if "train" not in config:
        raise ValueError(f"--resume {path}: the checkpoint has no training state")
    return config, tensors


def fit(model, data, cfg, *, out=None, resume=None, device="cpu", progress=True):
    """Train ``model`` on ``data.train``; checkpoint into ``out``; return the history
    (one dict per epoch). ``resume``: ``check_resume``'s result. Runs as DDP when
    torch.distributed is initialised; a DDP run resumed with the same number of
    processes continues exactly, with another number each process reseeds its noise."""
    rank, world = _world()
    if cfg.batch_size < world:
        raise ValueError(f"batch_size {cfg.batch_size} is smaller than the {world} processes; "
                         f"each process takes a share of every batch")
    device = torch.device(device)
    model.to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    noise = torch.Generator(device).manual_seed(cfg.seed * 1000 + 1 + rank)
    state = {"epoch": 0, "step": 0, "history": []}
    if resume is not None:
        config, tensors = resume
        model.load_state_dict(checkpoint.model_state(tensors))
        optimizer.load_state_dict(checkpoint.unflatten_optimizer(tensors, config["train"]["optimizer"]))
        if f"rng.noise.{rank}" in tensors and config["train"]["world_size"] == world:
            noise.set_state(tensors[f"rng.noise.{rank}"])
        state = {k: config["train"][k] for k in state}
    net = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    amp = cfg.amp == "on" or (cfg.amp == "auto" and device.type == "cuda"
                              and torch.cuda.is_bf16_supported())
    x_train, n = data.train.to(device), len(data.train)
    steps_per_epoch = max(1, math.ceil(n / cfg.batch_size) if world == 1 else n // cfg.batch_size)
    desc = f"{type(model).__name__} on {data.name}"
    # a live bar on a terminal; in a log (CI, nohup, a pipe) one line per epoch instead
    # of a bar redrawn ten times a second into one endless line
    report = progress and rank == 0
    bar = tqdm(total=cfg.epochs * steps_per_epoch, initial=state["step"], unit="step",
               disable=not report or not sys.stderr.isatty(), desc=desc)
    for epoch in range(state["epoch"], cfg.epochs):
        order = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed * 7919 + epoch))
        sums, count = torch.zeros(3, device=device), 0
        for b in range(steps_per_epoch):
            # every rank takes its share of the same global batch
            x = x_train[order[b * cfg.batch_size:(b + 1) * cfg.batch_size][rank::world].to(device)]
            beta = beta_at(cfg, state["step"] / steps_per_epoch) if model.is_vae else 0.0
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                parts = model.criterion(x, net(x, generator=noise), beta=beta,
                                        free_bits=cfg.free_bits)
            optimizer.zero_grad(set_to_none=True)
            parts.loss.backward()
            optimizer.step()
            sums += torch.stack([p.detach().float() for p in parts]) * len(x)
            count += len(x)
            state["step"] += 1
            bar.update()
        sums = torch.cat([sums, torch.tensor([count], device=device, dtype=sums.dtype)])
        if world > 1:
            dist.all_reduce(sums)
        loss, recon, kl = (sums[:3] / sums[3]).tolist()
        state["history"].append({"epoch": epoch + 1, "loss": loss, "recon": recon, "kl": kl,
                                 "beta": beta, "test_loss": evaluate(model, data.test.to(device))})
        state["epoch"] = epoch + 1
        bar.set_postfix(loss=f"{loss:.3f}", recon=f"{recon:.3f}", kl=f"{kl:.3f}", beta=f"{beta:.2f}")
        if report and bar.disable:
            print(f"{desc}: epoch {epoch + 1}/{cfg.epochs} loss {loss:.3f} recon {recon:.3f} "
                  f"kl {kl:.3f} beta {beta:.2f} test_loss {state['history'][-1]['test_loss']:.3f}",
                  file=sys.stderr, flush=True)
        if out is not None and (state["epoch"] % cfg.save_every == 0 or state["epoch"] == cfg.epochs):
            _save(out, model, optimizer, noise, state, cfg, rank, world)
    bar.close()
    return state["history"]


def _save(out, model, optimizer, noise, state, cfg, rank, world):
    noise_states = [noise.get_state()]
    if world > 1:  # every rank's noise state, so a resumed DDP run continues exactly
        noise_states = [None] * world
        dist.all_gather_object(noise_states, noise.get_state())
    if rank != 0:
        return
    tensors, optim_rest = checkpoint.flatten_optimizer(optimizer.state_dict())
    tensors.update({f"rng.noise.{r}": s for r, s in enumerate(noise_states)})
    checkpoint.save(out, model, tensors=tensors,
                    train={**state, "optimizer": optim_rest, "options": asdict(cfg),
                           "world_size": world})


@contextlib.contextmanager
def distributed(device):
    """Under torchrun (WORLD_SIZE set): init the process group (NCCL on CUDA, gloo on
    CPU) and yield this process's device; otherwise just yield ``device``."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        yield device
        return
    if device.type == "cuda":
        local_rank, count = int(os.environ.get("LOCAL_RANK", 0)), torch.cuda.device_count()
        if local_rank >= count:
            raise ValueError(
                f"--device cuda under torchrun: LOCAL_RANK is {local_rank} but this machine has "
                f"{count} CUDA device(s); start at most {count} processes per node, "
                "or pass --device cpu")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        yield device
        # every rank done (rank 0 saves last) before any tears its group down
        dist.barrier()
    finally:
        dist.destroy_process_group()


def pick_device(name):
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device must be auto, cpu, cuda or cuda:N, got {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine")
    return device


def build_model(args, input_shape):
    cls = BY_KIND[(args.model, args.arch)]
    arch = {"hidden": tuple(args.hidden)} if args.arch == "mlp" else {"channels": tuple(args.channels)}
    beta = args.beta if args.model == "vae" else 0.0
    return cls(input_shape, latent_dim=args.latent_dim, recon=args.recon, beta=beta, **arch)


def add_arguments(parser):
    a = parser.add_argument
    a("--data", default="digits", help="digits (default), mnist, fashion-mnist, a .npy/.npz file "
      "or a folder of images")
    a("--data-root", default="data", help="where torchvision data sets live (default: data)")
    a("--download", action="store_true", help="let torchvision download mnist/fashion-mnist")
    a("--model", choices=("vae", "ae"), default="vae")
    a("--arch", choices=("mlp", "conv"), default="mlp")
    a("--latent-dim", type=int, default=8)
    a("--hidden", type=int, nargs="+", default=[256, 128], help="MLP hidden sizes")
    a("--channels", type=int, nargs="+", default=[32, 64], help="conv channels per level")
    a("--recon", choices=_validate.RECONS, default="bce_logits")
    defaults = TrainConfig()
    for name, value in asdict(defaults).items():
        if name in ("anneal", "amp"):
            a(f"--{name}", choices=ANNEALING if name == "anneal" else ("auto", "on", "off"),
              default=value)
        else:
            a(f"--{name.replace('_', '-')}", type=type(value), default=value)
    a("--device", default="auto", help="auto (CUDA if present), cpu, cuda, cuda:N")
    a("--out", default="runs/train", help="checkpoint directory (default: runs/train)")
    a("--resume", metavar="CHECKPOINT", help="continue from this checkpoint (dir or file)")
    a("--no-progress", action="store_true", help="no progress bar")


def run(args):
    cfg = TrainConfig(**{k: getattr(args, k) for k in asdict(TrainConfig())})
    if args.model == "ae" and (args.free_bits or args.anneal != "none"):
        raise ValueError("--free-bits and --anneal apply to VAEs (--model vae) only")
    data = load_data(args.data, root=args.data_root, download=args.download)
    check_range(data, args.recon)
    torch.manual_seed(cfg.seed)
    model = build_model(args, data.input_shape)
    resume = check_resume(args.resume, model) if args.resume else None
    device = pick_device(args.device)
    checkpoint.prepare_dir(args.out)
    with distributed(device) as device:
        history = fit(model, data, cfg, out=args.out, resume=resume, device=device,
                      progress=not args.no_progress)
        if _world()[0] == 0:
            if history:
                last = history[-1]
                print(f"epoch {last['epoch']}/{cfg.epochs}: loss {last['loss']:.4g} (recon "
                      f"{last['recon']:.4g}, KL {last['kl']:.4g}), test loss {last['test_loss']:.4g}")
            print(f"checkpoint: {os.path.join(args.out, checkpoint.FILENAME)}")
            print(f"config:     {os.path.join(args.out, checkpoint.CONFIG_FILENAME)}")
    return 0
