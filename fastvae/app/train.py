"""``fastvae train``: train an autoencoder or a VAE, resumably, on one device or under torchrun.

    fastvae train --data digits --model vae --arch mlp --epochs 50 --out runs/x
    torchrun --nproc_per_node 2 -m fastvae train ...      # data-parallel (DDP)

Determinism: ``--seed`` fixes the initial weights, the data order (a permutation
drawn per epoch from (seed, epoch)) and the reparameterization noise (one
generator per process, saved in every checkpoint). A run resumed from its
epoch-k checkpoint therefore continues bit for bit like the uninterrupted run.
"""

import argparse
import contextlib
import math
import numbers
import os
import sys
from dataclasses import asdict, dataclass, fields

import torch
import torch.distributed as dist
from tqdm import tqdm

from fastvae import _validate
from fastvae.app import checkpoint
from fastvae.app.data import TORCHVISION_SETS, check_range, fingerprint, load_data
from fastvae.models import BY_KIND, PRIORS

ANNEALING = ("none", "linear", "cyclical")
MAX_SEED = 2**32 - 1  # a fresh run's --seed
SEED_BOUND = 2**50  # any run's (older ones may hold a negative seed): seed * 7919 + epoch fits


class TrainingDiverged(ValueError):
    """The loss became NaN or infinite: the run stops before saving over its last
    finite checkpoint."""


@dataclass
class TrainConfig:
    epochs: int = 50
    batch_size: int = 64
    lr: float = 1e-3
    beta: float = 1.0
    anneal: str = "none"       # KL weight schedule: none, linear warm-up, cyclical
    anneal_epochs: float = 10.0  # linear: epochs to ramp beta from 0
    cycles: int = 4            # cyclical: ramps over the run (each ramps over half its cycle)
    free_bits: float = 0.0     # nats per latent dimension not penalised
    seed: int = 0
    amp: str = "auto"          # bf16 autocast: auto = on CUDA
    save_every: int = 1        # epochs between checkpoints

    def __post_init__(self):
        _validate.check_choice("anneal", self.anneal, ANNEALING)
        _validate.check_choice("amp", self.amp, ("auto", "on", "off"))
        # numbers of the right kind (numpy scalars too), stored as Python's: they go into
        # the checkpoint's JSON
        for name in ("epochs", "batch_size", "cycles", "save_every", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r:.40}")
            setattr(self, name, int(value))
        for name in ("lr", "beta", "anneal_epochs", "free_bits"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r:.40}")
            setattr(self, name, float(value))
        if not -SEED_BOUND <= self.seed <= SEED_BOUND:
            # its derived seeds (noise_seed, epoch_order_seed) must be torch seeds
            raise ValueError(f"seed must be in [-2**50, 2**50], got {self.seed}")
        for name in ("epochs", "batch_size", "cycles", "save_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("lr", "anneal_epochs"):
            if not (getattr(self, name) > 0 and math.isfinite(getattr(self, name))):
                raise ValueError(f"{name} must be finite and > 0, got {getattr(self, name)}")
        for name in ("beta", "free_bits"):
            value = getattr(self, name)
            # (the loss is float32: a larger weight or floor would not fit it)
            if not (math.isfinite(value) and 0 <= value <= _validate.FLOAT32_MAX):
                raise ValueError(f"{name} must be >= 0 and at most float32's maximum "
                                 f"({_validate.FLOAT32_MAX:.4g}), got {value}")
        # the loss compares each latent element's KL summed over a batch with this floor
        if self.free_bits * self.batch_size > _validate.FLOAT32_MAX:
            raise ValueError(f"free_bits times the batch size ({self.free_bits:g} x {self.batch_size}) "
                             f"must be at most float32's maximum ({_validate.FLOAT32_MAX:.4g})")


def check_seed(seed):
    """A fresh run's seed: 0 to MAX_SEED (a resumed run keeps the one it was trained with;
    runs from before this bound may hold another, which torch accepted)."""
    if not 0 <= seed <= MAX_SEED:
        raise ValueError(f"--seed must be in [0, {MAX_SEED}], got {seed}")


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


# ---- seeds: every random stream of a run follows from --seed ------------------


def noise_seed(seed, rank):
    """Seed of process ``rank``'s reparameterization-noise generator (its own stream,
    so that data-parallel processes draw different noise)."""
    return seed * 1000 + 1 + rank


def epoch_order_seed(seed, epoch):
    """Seed of the data permutation of ``epoch``: the same on every process, and a
    function of the epoch alone, so a resumed run shuffles as the uninterrupted one."""
    return seed * 7919 + epoch


def _world():
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def check_world(cfg, n_train, world):
    """Every process must get a share of every batch."""
    if cfg.batch_size < world:
        raise ValueError(f"batch_size {cfg.batch_size} is smaller than the {world} processes; "
                         f"each process takes a share of every batch")
    if n_train < world:
        raise ValueError(f"the data has {n_train} training sample(s), fewer than the {world} "
                         f"processes; each process takes a share of every batch")


@torch.no_grad()
def evaluate(model, x, batch_size=1024):
    """Mean per-sample score (loss at z = mu) over ``x``: deterministic, no RNG used."""
    model.eval()
    total = sum(model.score(x[i:i + batch_size]).sum() for i in range(0, len(x), batch_size))
    model.train()
    return (total / len(x)).item()


# ---- the training loop --------------------------------------------------------


@dataclass
class _Run:
    """What the steps of ``fit`` share."""
    model: torch.nn.Module
    net: torch.nn.Module        # what the steps call: the model, in DDP when there are several processes
    optimizer: torch.optim.Optimizer
    noise: torch.Generator      # this process's reparameterization noise
    amp: bool                   # bf16 autocast
    device: torch.device
    rank: int
    world: int
    x_train: torch.Tensor       # the training data, on the device
    steps_per_epoch: int
    data: dict                  # {"name", "sha256": data.fingerprint[, "root"]}, saved with every checkpoint


def fit(model, data, cfg, *, out=None, resume=None, device="cpu", progress=True):
    """Train ``model`` on ``data.train``; checkpoint into ``out``; return the history
    (one dict per epoch). ``resume``: ``(config, tensors)`` of a checkpoint checked by
    ``check_resume``. Runs as DDP when torch.distributed is initialised; a DDP run
    resumed with the same number of processes continues exactly, with another number
    each process reseeds its noise."""
    run = _set_up(model, data, cfg, torch.device(device))   # optimizer, noise generator, AMP
    state = {"epoch": 0, "step": 0, "history": []}
    if resume is not None:
        state = _restore(run, *resume)                      # weights, Adam, noise, history
    if run.world > 1:                                       # data-parallel, from the restored weights
        run.net = torch.nn.parallel.DistributedDataParallel(model)
    log = _ProgressLog(run, cfg, f"{type(model).__name__} on {data.name}", state["step"], progress)
    for epoch in range(state["epoch"], cfg.epochs):
        sums, beta = _train_one_epoch(run, cfg, state, epoch, log)   # shuffle, optimizer steps
        record = _epoch_record(run, data, sums, epoch, beta)        # all-reduce, test loss
        _check_finite(record, out)                                  # stop before saving a NaN model
        state["history"].append(record)
        state["epoch"] = epoch + 1
        log.epoch_done(record)
        if out is not None and (state["epoch"] % cfg.save_every == 0 or state["epoch"] == cfg.epochs):
            _save(out, run, state, cfg)                            # atomic checkpoint
    log.close()
    return state["history"]


def _check_finite(record, out):
    """A NaN or infinite loss (too large a learning rate, an extreme --obs-logvar) ends the
    run with an error, exit code 2: saving would replace the last finite checkpoint with
    weights that cannot be exported or resumed usefully. Every process sees the same
    all-reduced loss, so every process stops."""
    bad = [k for k in ("loss", "test_loss") if not math.isfinite(record[k])]
    if bad:
        kept = "" if out is None else (f"; {os.path.join(out, checkpoint.FILENAME)} keeps the last "
                                       f"epoch with a finite loss, if one was saved")
        raise TrainingDiverged(
            f"training diverged at epoch {record['epoch']}: {bad[0]} is {record[bad[0]]} (a "
            f"smaller learning rate may help){kept}")


def _set_up(model, data, cfg, device):
    """Move the model, make the optimizer and the noise generator, decide AMP."""
    rank, world = _world()
    check_world(cfg, len(data.train), world)
    model.to(device)
    n = len(data.train)
    return _Run(
        model=model,
        net=model,
        optimizer=torch.optim.Adam(model.parameters(), lr=cfg.lr),
        noise=torch.Generator(device).manual_seed(noise_seed(cfg.seed, rank)),
        amp=cfg.amp == "on" or (cfg.amp == "auto" and device.type == "cuda"
                                and torch.cuda.is_bf16_supported()),
        device=device, rank=rank, world=world, x_train=data.train.to(device),
        # DDP drops the last partial batch: every process must take the same number of steps
        steps_per_epoch=max(1, math.ceil(n / cfg.batch_size) if world == 1 else n // cfg.batch_size),
        data={"name": data.name, "sha256": fingerprint(data),
              **({} if data.root is None else {"root": data.root})})


def _restore(run, config, tensors):
    """Load a checkpoint's weights, optimizer and noise states; return its progress."""
    train = config["train"]
    run.model.load_state_dict(checkpoint.model_state(tensors))
    run.optimizer.load_state_dict(checkpoint.unflatten_optimizer(tensors, train["optimizer"]))
    saved_noise = tensors.get(f"rng.noise.{run.rank}")
    if saved_noise is not None and train["world_size"] == run.world:
        run.noise.set_state(saved_noise)
    return {"epoch": train["epoch"], "step": train["step"], "history": list(train["history"])}


def _train_one_epoch(run, cfg, state, epoch, log):
    """One pass over the shuffled training data; returns the (loss, recon, kl, count)
    sums of this process and the last step's KL weight."""
    n = len(run.x_train)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(epoch_order_seed(cfg.seed, epoch)))
    sums, count = torch.zeros(3, device=run.device), 0
    for b in range(run.steps_per_epoch):
        # every process takes its share of the same global batch
        x = run.x_train[order[b * cfg.batch_size:(b + 1) * cfg.batch_size][run.rank::run.world]
                        .to(run.device)]
        beta = beta_at(cfg, state["step"] / run.steps_per_epoch) if run.model.is_vae else 0.0
        with torch.autocast(run.device.type, dtype=torch.bfloat16, enabled=run.amp):
            parts = run.model.criterion(x, run.net(x, generator=run.noise), beta=beta,
                                        free_bits=cfg.free_bits)
        run.optimizer.zero_grad(set_to_none=True)
        parts.loss.backward()
        run.optimizer.step()
        sums += torch.stack([p.detach().float() for p in parts]) * len(x)
        count += len(x)
        state["step"] += 1
        log.step()
    return torch.cat([sums, torch.tensor([count], device=run.device, dtype=sums.dtype)]), beta


def _epoch_record(run, data, sums, epoch, beta):
    """The history entry of an epoch: means over all processes, and the test loss."""
    if run.world > 1:
        dist.all_reduce(sums)
    loss, recon, kl = (sums[:3] / sums[3]).tolist()
    return {"epoch": epoch + 1, "loss": loss, "recon": recon, "kl": kl, "beta": beta,
            "test_loss": evaluate(run.model, data.test.to(run.device))}


class _ProgressLog:
    """A live bar on a terminal; in a log (CI, nohup, a pipe) one line per epoch instead
    of a bar redrawn ten times a second into one endless line. Process 0 only."""

    def __init__(self, run, cfg, desc, done_steps, enabled):
        self.report = enabled and run.rank == 0
        self.desc, self.epochs = desc, cfg.epochs
        self.bar = tqdm(total=cfg.epochs * run.steps_per_epoch, initial=done_steps, unit="step",
                        disable=not self.report or not sys.stderr.isatty(), desc=desc)

    def step(self):
        self.bar.update()

    def epoch_done(self, r):
        self.bar.set_postfix(loss=f"{r['loss']:.3f}", recon=f"{r['recon']:.3f}", kl=f"{r['kl']:.3f}",
                             beta=f"{r['beta']:.2f}")
        if self.report and self.bar.disable:
            print(f"{self.desc}: epoch {r['epoch']}/{self.epochs} loss {r['loss']:.3f} recon "
                  f"{r['recon']:.3f} kl {r['kl']:.3f} beta {r['beta']:.2f} test_loss "
                  f"{r['test_loss']:.3f}", file=sys.stderr, flush=True)

    def close(self):
        self.bar.close()


def _save(out, run, state, cfg):
    noise_states = [run.noise.get_state()]
    if run.world > 1:  # every process's noise state, so a resumed DDP run continues exactly
        noise_states = [None] * run.world
        dist.all_gather_object(noise_states, run.noise.get_state())
    if run.rank != 0:
        return
    tensors, optim_rest = checkpoint.flatten_optimizer(run.optimizer.state_dict())
    tensors.update({f"rng.noise.{r}": s for r, s in enumerate(noise_states)})
    checkpoint.save(out, run.model, tensors=tensors,
                    train={**state, "optimizer": optim_rest, "options": asdict(cfg),
                           "world_size": run.world, "data": run.data})


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
    except (RuntimeError, TypeError):
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device must be auto, cpu, cuda or cuda:N, got {name!r}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: CUDA is not available on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} "
                             f"CUDA device(s)")
    return device


# ---- options ------------------------------------------------------------------
#
# The options that define a run. On the command line they default to None, so that
# the ones given explicitly are known: a fresh run fills in the defaults below, a
# resumed run the options saved in its checkpoint (explicit ones must agree).

MODEL_DEFAULTS = {"model": "vae", "arch": "mlp", "latent_dim": 8, "hidden": [256, 128],
                  "channels": [32, 64], "recon": "bce_logits", "obs_logvar": None,
                  "prior": "standard"}
RUN_DEFAULTS = {"data": "digits", **MODEL_DEFAULTS, **asdict(TrainConfig())}
# may differ on resume: more epochs extend the run; how often it saves does not change it;
# the data may be given by another path (its content is checked by hash)
RESUME_MAY_CHANGE = ("epochs", "save_every", "data")
DEFAULT_OUT = os.path.join("runs", "train")
DEFAULT_DATA_ROOT = "data"
NAMED_DATA = ("digits", *TORCHVISION_SETS)  # --data names, not paths


def build_model(options, input_shape):
    cls = BY_KIND[(options["model"], options["arch"])]
    arch_key = "hidden" if options["arch"] == "mlp" else "channels"
    beta = options["beta"] if options["model"] == "vae" else 0.0
    prior = {"prior": options["prior"]} if options["model"] == "vae" else {}
    return cls(input_shape, latent_dim=options["latent_dim"], recon=options["recon"], beta=beta,
               obs_logvar=options["obs_logvar"], **prior, **{arch_key: tuple(options[arch_key])})


def check_model_fits(options, input_shape, device):
    """Refuse, before allocating it, a model whose weights, gradients and Adam state
    (4 float32 copies) exceed the memory of ``device``."""
    try:
        with torch.device("meta"):
            n_params = sum(p.numel() for p in build_model(options, input_shape).parameters())
    except (RuntimeError, OverflowError, TypeError):  # a size past what a tensor can hold
        arch = "--hidden" if options["arch"] == "mlp" else "--channels"
        raise ValueError(f"{arch} {' '.join(map(str, options[arch[2:]]))} and --latent-dim "
                         f"{options['latent_dim']}: a layer is too large for a tensor") from None
    need = 4 * 4 * n_params
    if device.type == "cuda":
        have = torch.cuda.get_device_properties(device).total_memory
    else:
        have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if need > have:
        arch = "--hidden" if options["arch"] == "mlp" else "--channels"
        raise ValueError(f"{arch} {' '.join(map(str, options[arch[2:]]))} and --latent-dim "
                         f"{options['latent_dim']}: the model has {n_params:.3g} parameters, "
                         f"{need / 2**30:.3g} GiB with gradients and Adam state; {device} has "
                         f"{have / 2**30:.3g} GiB")


def saved_options(config, where):
    """The run options recorded in a training checkpoint's config."""
    model, train = config["model"], config["train"]
    kinds = {cls.__name__: kind for kind, cls in BY_KIND.items()}
    kind = kinds.get(model.get("class"))
    arch_key = "hidden" if kind is not None and kind[1] == "mlp" else "channels"
    if kind is None or not isinstance(model.get(arch_key), list):
        raise ValueError(f"{where}: the model config is invalid: {model!r}")
    options = {"data": train["data"]["name"], "model": kind[0], "arch": kind[1],
               "latent_dim": model.get("latent_dim"), "recon": model.get("recon"),
               "obs_logvar": model.get("obs_logvar"), "prior": model.get("prior", "standard"),
               arch_key: model[arch_key], **train["options"]}
    return options


def resolve_options(explicit, saved=None):
    """The options of the run: defaults (or ``saved``, resuming) overridden by the
    ``explicit`` ones, which must agree with ``saved`` unless in ``RESUME_MAY_CHANGE``."""
    if saved is None:
        return {**RUN_DEFAULTS, **explicit}
    relevant = set(RUN_DEFAULTS) - {"channels" if saved["arch"] == "mlp" else "hidden"}
    for name, value in explicit.items():
        if name in relevant and name not in RESUME_MAY_CHANGE and not _same(value, saved[name]):
            flag = "--" + name.replace("_", "-")
            shown = " ".join(map(str, value)) if isinstance(value, list) else value
            was = " ".join(map(str, saved[name])) if isinstance(saved[name], list) else saved[name]
            raise ValueError(f"{flag} {shown} differs from the resumed run's {flag} {was}; a resumed "
                             f"run keeps its options (leave {flag} out)")
    options = {**RUN_DEFAULTS, **saved, **{k: v for k, v in explicit.items() if k in RESUME_MAY_CHANGE}}
    done = saved["epochs"]
    if options["epochs"] != done and options["anneal"] == "cyclical":
        raise ValueError(f"--epochs {options['epochs']}: the run's cyclical beta schedule spans its "
                         f"{done} epochs, so a longer run would not continue it; resume with "
                         f"--epochs {done}")
    return options


def _same(given, saved):
    if isinstance(given, list) or isinstance(saved, list):
        return isinstance(given, list) and isinstance(saved, list) and list(given) == list(saved)
    if isinstance(given, float) or isinstance(saved, float):
        return isinstance(saved, (int, float)) and float(given) == float(saved)
    return given == saved


def obs_logvar_option(text):
    """--obs-logvar: "learned", "optimal" or a finite number."""
    if text in ("learned", "optimal"):
        return text
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be learned, optimal or a finite number, got {text!r}")
    return value


def add_arguments(parser):
    a = parser.add_argument
    d = RUN_DEFAULTS
    a("--data", help="digits (default), mnist, fashion-mnist, a .npy/.npz file or a folder of images")
    a("--data-root", help=f"where torchvision data sets live (default: {DEFAULT_DATA_ROOT}, or "
                          f"the resumed run's)")
    a("--download", action="store_true", help="let torchvision download mnist/fashion-mnist")
    a("--model", choices=("vae", "ae"), help=f"(default: {d['model']})")
    a("--arch", choices=("mlp", "conv"), help=f"(default: {d['arch']})")
    a("--latent-dim", type=int, help=f"(default: {d['latent_dim']})")
    a("--hidden", type=int, nargs="+", help="MLP hidden sizes (default: 256 128)")
    a("--channels", type=int, nargs="+", help="conv channels per level (default: 32 64)")
    a("--recon", choices=_validate.RECONS, help=f"(default: {d['recon']})")
    a("--obs-logvar", type=obs_logvar_option, metavar="learned|optimal|FLOAT",
      help="gaussian/laplace: log sigma^2 (log b) of the observation model: learned (a "
           "trained scalar), optimal (fitted to each batch) or a number (default: 0)")
    a("--prior", choices=PRIORS,
      help="VAEs: the KL's prior, standard (N(0, I)) or learned (a trained diagonal Gaussian, "
           "sampled from when generating) (default: standard)")
    for field in fields(TrainConfig):
        flag = f"--{field.name.replace('_', '-')}"
        default = f"(default: {d[field.name]})"
        if field.name in ("anneal", "amp"):
            a(flag, choices=ANNEALING if field.name == "anneal" else ("auto", "on", "off"), help=default)
        else:
            a(flag, type=field.type, help=default)
    a("--device", default="auto", help="auto (CUDA if present), cpu, cuda, cuda:N")
    a("--out", help=f"checkpoint directory (default: {DEFAULT_OUT}, or the --resume directory)")
    a("--resume", metavar="CHECKPOINT",
      help="continue the run saved in this checkpoint (dir or file) with its options, in its directory")
    a("--overwrite", action="store_true",
      help="replace the run already saved in --out (without it, a fresh run there is refused)")
    a("--no-progress", action="store_true", help="no progress bar")


def check_no_run_in(out):
    """A fresh run saves over the checkpoint in ``out``: refuse when one is there
    (two runs with the default --out would otherwise lose the first), before any work."""
    file = os.path.join(out, checkpoint.FILENAME)
    if os.path.isfile(file):
        raise ValueError(f"--out {out} already holds a trained run ({file}); pass --resume {out} "
                         f"to continue it, --overwrite to replace it, or another --out")
    config = os.path.join(out, checkpoint.CONFIG_FILENAME)
    if os.path.lexists(config):  # a run's is written with its checkpoint: this one is not a run's
        raise ValueError(f"--out {out} already holds a {checkpoint.CONFIG_FILENAME}, which a run "
                         f"would replace; pass --overwrite to replace it, or another --out")


def data_source(source):
    """A data file or folder as an absolute path, which is what the checkpoint records:
    ``--resume`` then finds it from any working directory. Named data sets stay names,
    and a missing path stays as typed for load_data's error."""
    return source if source in NAMED_DATA or not os.path.exists(source) else os.path.abspath(source)


def check_saved_data(source, resume):
    """The data a resumed run was trained on must still be where it was recorded."""
    if source not in NAMED_DATA and not os.path.exists(source):
        where = "" if os.path.isabs(source) else f" (relative to {os.getcwd()})"
        raise FileNotFoundError(f"--resume {resume}: the run's data {source}{where} is not there; "
                                f"pass --data PATH with the same data (its hash is checked)")


def check_resume(path, device):
    """Load a training checkpoint to resume: its config, tensors and model, every
    part checked so that a damaged or tampered file is a clear error, not a crash
    mid-training."""
    where = f"--resume {path}"
    config, tensors = checkpoint.load(path)
    train = config.get("train")
    if not isinstance(train, dict):
        raise ValueError(f"{where}: the checkpoint has no training state")
    _check_train_fields(train, where)
    options = saved_options(config, where)
    try:
        TrainConfig(**train["options"])
    except (TypeError, ValueError) as err:
        raise ValueError(f"{where}: the saved options are invalid: {err}") from None
    model = checkpoint.build_model(config["model"], tensors, where)
    _check_extra_tensors(model, tensors, train, where, device)
    return config, tensors, model, options


def _check_train_fields(train, where):
    def need(key, ok, what):
        if key not in train or not ok(train[key]):
            raise ValueError(f"{where}: the checkpoint's train.{key} must be {what}, got "
                             f"{train.get(key, 'nothing')!r:.80}")

    def count(v):
        return isinstance(v, int) and not isinstance(v, bool) and v >= 0

    need("epoch", count, "a count")
    need("step", count, "a count")
    need("world_size", lambda v: count(v) and v >= 1, "a positive int")
    need("history", lambda v: isinstance(v, list) and len(v) == train["epoch"]
         and all(isinstance(e, dict) for e in v), f"a list of {train['epoch']} epoch records")
    need("options", lambda v: isinstance(v, dict) and set(v) == {f.name for f in fields(TrainConfig)},
         "the training options")
    need("optimizer", lambda v: isinstance(v, dict) and isinstance(v.get("param_groups"), list)
         and isinstance(v.get("state"), dict), "Adam's state")
    need("data", lambda v: isinstance(v, dict) and isinstance(v.get("name"), str)
         and isinstance(v.get("sha256"), str) and isinstance(v.get("root", ""), str),
         "the data's name and hash")


ADAM_STATE = {"step": (), "exp_avg": None, "exp_avg_sq": None}  # None: the parameter's shape


def _check_extra_tensors(model, tensors, train, where, device):
    """Optimizer and generator tensors: names, shapes and sizes a run can load."""
    params = list(model.parameters())
    noise_size = torch.Generator(device).get_state().numel()
    state = {}
    for name, t in tensors.items():
        if name.startswith("model."):
            continue
        parts = name.split(".")
        if name.startswith("optim.") and len(parts) == 3 and parts[1].isdigit() and parts[2] in ADAM_STATE:
            index, key = int(parts[1]), parts[2]
            if index >= len(params):
                raise ValueError(f"{where}: optimizer tensor {name} is for parameter {index}; the "
                                 f"model has {len(params)}")
            shape = ADAM_STATE[key] if ADAM_STATE[key] is not None else tuple(params[index].shape)
            if tuple(t.shape) != shape:
                raise ValueError(f"{where}: optimizer tensor {name} has shape {list(t.shape)}, "
                                 f"expected {list(shape)}")
            # Adam's own values: a finite step count and moments, a second moment >= 0 (else
            # the first step makes NaN weights or fails inside torch)
            if not t.is_floating_point() or not torch.isfinite(t).all() \
                    or (key != "exp_avg" and (t < 0).any()):
                raise ValueError(f"{where}: optimizer tensor {name} holds values Adam never "
                                 f"makes (non-finite{', negative' if key != 'exp_avg' else ''}, "
                                 f"or not floating point: {t.dtype})")
            state.setdefault(index, set()).add(key)
        elif (name.startswith("rng.noise.") and len(parts) == 3 and parts[2].isdigit()
              and int(parts[2]) < train["world_size"]):
            if t.dtype != torch.uint8 or t.dim() != 1 or t.numel() != noise_size:
                raise ValueError(f"{where}: {name} holds {t.numel()} values of {t.dtype}; a "
                                 f"{device.type} generator state is {noise_size} uint8 values (was "
                                 f"the run on another device type?)")
            try:
                torch.Generator(device).set_state(t)
            except RuntimeError as err:
                raise ValueError(f"{where}: {name} is not a generator state: {err}") from None
        else:
            raise ValueError(f"{where}: unexpected tensor {name} in the checkpoint")
    # (the loop above refused any rng.noise.R with R >= world_size: the states present are
    # distinct ranks below it, so a world_size past their count lacks some. Counted, not
    # listed: a tampered world_size of 10^12 would make a list of 10^12 names)
    stored = sum(1 for name in tensors if name.startswith("rng.noise."))
    if stored < train["world_size"]:
        first = next(r for r in range(stored + 1) if f"rng.noise.{r}" not in tensors)
        raise ValueError(f"{where}: the checkpoint lacks rng.noise.{first}: its train.world_size "
                         f"is {train['world_size']}, and it holds {stored} generator states")
    missing = [f"optim.{i}.{key}" for i, keys in state.items() for key in ADAM_STATE if key not in keys]
    if missing:
        raise ValueError(f"{where}: the checkpoint lacks {', '.join(missing[:4])}"
                         + (f" and {len(missing) - 4} more" if len(missing) > 4 else ""))
    if train["optimizer"]["state"]:
        raise ValueError(f"{where}: unexpected non-tensor optimizer state "
                         f"{train['optimizer']['state']!r:.80}")
    groups = train["optimizer"]["param_groups"]
    if (len(groups) != 1 or not isinstance(groups[0], dict)
            or groups[0].get("params") != list(range(len(params)))
            or not all(_is_number(groups[0].get(k)) for k in ("lr", "eps", "weight_decay"))
            or not (isinstance(groups[0].get("betas"), list) and len(groups[0]["betas"]) == 2
                    and all(map(_is_number, groups[0]["betas"])))):
        raise ValueError(f"{where}: the optimizer's param_groups are not one Adam group over the "
                         f"model's {len(params)} parameters: {groups!r:.120}")
    _check_adam_options(groups[0], params, where)
    try:
        optimizer = torch.optim.Adam(params)
        optimizer.load_state_dict(checkpoint.unflatten_optimizer(tensors, train["optimizer"]))
    except (ValueError, KeyError, TypeError, RuntimeError) as err:
        raise ValueError(f"{where}: the optimizer state does not fit the model: {err}") from None


def _check_adam_options(group, params, where):
    """The saved Adam options take the types and ranges Adam's own have: a flag stored as
    a string ("amsgrad": "no") is truthy and failed only at the first step."""
    fresh = torch.optim.Adam(params).param_groups[0]
    for key, default in fresh.items():
        if key == "params" or key not in group:  # (a key another torch version lacks: its default)
            continue
        value = group[key]
        flag = isinstance(default, bool) or (default is None and key in ("foreach", "fused"))
        if flag and not (isinstance(value, bool) or (default is None and value is None)):
            raise ValueError(f"{where}: the optimizer's {key} must be "
                             f"{'true, false or null' if default is None else 'true or false'}, "
                             f"got {value!r:.40}")
    lr, eps, decay, betas = group["lr"], group["eps"], group["weight_decay"], group["betas"]
    if not (lr > 0 and eps >= 0 and decay >= 0 and all(0 <= b < 1 for b in betas)):
        raise ValueError(f"{where}: the optimizer's options are out of Adam's range: lr {lr}, eps "
                         f"{eps}, weight_decay {decay}, betas {betas}")


def _with_flag(message):
    """A TrainConfig message ("epochs must be >= 1, ...") as the command line names its
    option ("--epochs must be >= 1, ...")."""
    name, _, rest = message.partition(" ")
    if name in {f.name for f in fields(TrainConfig)}:
        return f"--{name.replace('_', '-')} {rest}"
    return message


def _is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def run(args):
    explicit = {k: getattr(args, k) for k in RUN_DEFAULTS if getattr(args, k) is not None}
    device = pick_device(args.device)
    resume = None
    if args.resume is not None:  # (an empty --resume "" is a missing checkpoint, not a fresh run)
        if args.overwrite:
            raise ValueError("--overwrite replaces a run and --resume continues it: give one of them")
        config, tensors, model, saved = check_resume(args.resume, device)
        options = resolve_options(explicit, saved)
        out = os.path.dirname(os.path.abspath(checkpoint.checkpoint_file(args.resume)))
        if args.out is not None and os.path.realpath(args.out) != os.path.realpath(out):
            raise ValueError(f"--out {args.out}: a resumed run writes back to its own directory "
                             f"{out} (leave --out out)")
        resume = (config, tensors)
    else:
        options = resolve_options(explicit)
        out = args.out if args.out is not None else DEFAULT_OUT
        if not args.overwrite:
            check_no_run_in(out)
    if resume is not None and "data" not in explicit:
        check_saved_data(options["data"], args.resume)
    options["data"] = data_source(options["data"])
    if resume is None:  # (a resumed run keeps its own seed)
        check_seed(options["seed"])
    try:
        cfg = TrainConfig(**{f.name: options[f.name] for f in fields(TrainConfig)})
    except (TypeError, ValueError) as err:
        raise type(err)(_with_flag(str(err))) from None
    if options["model"] == "ae" and (cfg.free_bits or cfg.anneal != "none"):
        raise ValueError("--free-bits and --anneal apply to VAEs (--model vae) only")
    if options["model"] == "ae" and "beta" in explicit and resume is None:
        # (an autoencoder has no KL to weigh: the value would be ignored)
        raise ValueError(f"--beta {explicit['beta']}: applies to VAEs (--model vae) only")
    if options["model"] == "ae" and options["prior"] != "standard":
        raise ValueError(f"--prior {options['prior']}: applies to VAEs (--model vae) only")
    data_root = args.data_root
    if data_root is None:  # a resumed torchvision run reads its files where it did before
        data_root = DEFAULT_DATA_ROOT if resume is None \
            else resume[0]["train"]["data"].get("root", DEFAULT_DATA_ROOT)
    data = load_data(options["data"], root=data_root, download=args.download)
    check_range(data, options["recon"])
    if resume is None:
        check_model_fits(options, data.input_shape, device)
        torch.manual_seed(cfg.seed)
        model = build_model(options, data.input_shape)
    elif fingerprint(data) != resume[0]["train"]["data"]["sha256"]:
        raise ValueError(f"--data {options['data']}: differs from the data the run was trained on "
                         f"({resume[0]['train']['data']['name']}); its hash does not match")
    elif cfg.epochs < resume[0]["train"]["epoch"]:
        raise ValueError(f"--epochs {cfg.epochs}: the resumed run has already trained "
                         f"{resume[0]['train']['epoch']} epochs")
    created = not os.path.exists(out)
    checkpoint.prepare_dir(out)
    try:
        with distributed(device) as device:
            history = fit(model, data, cfg, out=out, resume=resume, device=device,
                          progress=not args.no_progress)
            if _world()[0] == 0:
                if history:
                    last = history[-1]
                    print(f"epoch {last['epoch']}/{cfg.epochs}: loss {last['loss']:.4g} (recon "
                          f"{last['recon']:.4g}, KL {last['kl']:.4g}), test loss "
                          f"{last['test_loss']:.4g}")
                print(f"checkpoint: {os.path.join(out, checkpoint.FILENAME)}")
                print(f"config:     {os.path.join(out, checkpoint.CONFIG_FILENAME)}")
    except BaseException:
        if created:  # a run that wrote nothing leaves no folder behind (under torchrun each
            with contextlib.suppress(OSError):  # rank tries; rmdir removes only an empty one)
                os.rmdir(out)
        raise
    return 0
