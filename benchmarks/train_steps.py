"""The real training step on a GPU, measured (issue 13): a case group of its own,
run by ``benchmarks/gpu_check.py``.

Three VAEs, each trained with the same loss written two ways side by side:

    plain    z = mu + randn_like(std) std;  recon(x_hat, x, "sum") + beta (-1/2 sum(1 + lv - mu^2 - e^lv))
    fastvae  z = fastvae.reparameterize(mu, lv);  fastvae.vae_loss(x_hat, x, mu, lv, recon, beta)

    mlp784   the repo's MLPVAE, 784-d data, 400 hidden, 20 latents, batch 128, bce_logits
    conv64   the repo's ConvVAE, 3x64x64 images, channels (32, 64, 128), 64 latents, batch 64, bce_logits
    ldm256   a latent-diffusion-style conv autoencoder built here (GroupNorm + SiLU convolutions,
             3x256x256 -> 4x32x32 latents), batch 8, mse, beta 1e-6

under four ways to run a step: ``eager``, ``compile`` (torch.compile of the forward and
loss; the backward is compiled with it), ``reduce-overhead`` (the same under
CUDA graphs) and ``bf16`` (eager under bf16 autocast). The optimizer is fused
Adam, eager, the same in every row. Each row reports steps per second and the
peak memory; the eager rows also the share of the step's device time spent in
the loss and the sampling (torch.profiler, see ``phase_device_time``).

Everything but the measurements runs on the CPU too (tests/benchmarks/test_train_steps.py).
"""

import bisect
import copy
import time

import torch
import torch.nn.functional as F
from torch import nn

IMPLS = ("plain", "fastvae")
VARIANTS = ("eager", "compile", "reduce-overhead", "bf16")
MODELS = ("mlp784", "conv64", "ldm256")


# ---- the models ------------------------------------------------------------------


class LatentDiffusionStyleVAE(nn.Module):
    """The shape of a latent-diffusion autoencoder, small: three stride-2
    GroupNorm + SiLU convolution levels take 3xHxW images to 4x(H/8)x(W/8) latent
    maps (mean and log-variance), nearest-upsampling convolutions bring them back.
    Built in code: nothing is downloaded."""

    def __init__(self, channels=3, latent_channels=4, widths=(64, 128, 256)):
        super().__init__()

        def block(c_in, c_out, stride=1):
            return [nn.Conv2d(c_in, c_out, 3, stride, 1), nn.GroupNorm(32, c_out), nn.SiLU()]

        w1, w2, w3 = widths
        self.encoder = nn.Sequential(
            *block(channels, w1), *block(w1, w1, 2), *block(w1, w2, 2), *block(w2, w3, 2),
            nn.Conv2d(w3, 2 * latent_channels, 3, 1, 1))

        def up(c_in, c_out):
            return [nn.Upsample(scale_factor=2, mode="nearest"), *block(c_in, c_out)]

        self.decoder = nn.Sequential(
            *block(latent_channels, w3), *up(w3, w2), *up(w2, w1), *up(w1, w1),
            nn.Conv2d(w1, channels, 3, 1, 1))

    def encode(self, x):
        mu, logvar = self.encoder(x).chunk(2, dim=1)
        return mu, logvar


def build(model, device, small=False):
    """(module with encode / decoder, data batch, recon, beta) for one of MODELS.
    ``small``: the same architecture at a size for CPU tests."""
    from fastvae.models import MLPVAE, ConvVAE

    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    if model == "mlp784":
        net = MLPVAE((784,), latent_dim=20, hidden=(400,), recon="bce_logits")
        x = torch.rand(8 if small else 128, 784, generator=gen)
        recon, beta = "bce_logits", 1.0
    elif model == "conv64":
        size = 16 if small else 64
        net = ConvVAE((3, size, size), latent_dim=64, channels=(32, 64, 128), recon="bce_logits")
        x = torch.rand(4 if small else 64, 3, size, size, generator=gen)
        recon, beta = "bce_logits", 1.0
    elif model == "ldm256":
        net = LatentDiffusionStyleVAE(widths=(32, 32, 32) if small else (64, 128, 256))
        size = 32 if small else 256
        x = torch.rand(2 if small else 8, 3, size, size, generator=gen) * 2 - 1
        recon, beta = "mse", 1e-6
    else:
        raise ValueError(f"model must be one of {MODELS}, got {model!r}")
    return net.to(device), x.to(device), recon, beta


# ---- the loss, two ways ----------------------------------------------------------

_PLAIN_RECON = {"mse": F.mse_loss, "bce_logits": F.binary_cross_entropy_with_logits}


def sampler(impl):
    """(mu, logvar) -> z."""
    if impl == "fastvae":
        import fastvae

        return fastvae.reparameterize

    def sample(mu, logvar):
        std = torch.exp(0.5 * logvar)
        return mu + torch.randn_like(std) * std
    return sample


def criterion(impl, recon, beta):
    """(x_hat, x, mu, logvar) -> the summed loss."""
    if impl == "fastvae":
        import fastvae

        return lambda x_hat, x, mu, logvar: fastvae.vae_loss(x_hat, x, mu, logvar, recon=recon,
                                                              beta=beta)

    def loss(x_hat, x, mu, logvar):
        kl = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())
        return _PLAIN_RECON[recon](x_hat, x, reduction="sum") + beta * kl
    return loss


def forward_loss(impl, recon, beta):
    """(model, x) -> loss: encode, sample, decode, loss."""
    sample, loss = sampler(impl), criterion(impl, recon, beta)

    def fn(model, x):
        mu, logvar = model.encode(x)
        return loss(model.decoder(sample(mu, logvar)), x, mu, logvar)
    return fn


def _autocast(variant, device):
    if variant == "bf16":
        return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)
    return torch.autocast(device_type=torch.device(device).type, enabled=False)


def make_step(impl, variant, model, x, recon, beta):
    """One training step (forward, loss, backward, fused-or-foreach Adam) as a
    zero-argument callable returning the loss; its optimizer is its own."""
    device = x.device
    fused = device.type == "cuda"
    opt = torch.optim.Adam(model.parameters(), lr=1e-4, fused=fused, foreach=not fused)
    loss_fn = forward_loss(impl, recon, beta)

    def forward(x):
        with _autocast(variant, device):
            return loss_fn(model, x)

    graphs = variant == "reduce-overhead"
    if variant in ("compile", "reduce-overhead"):
        forward = torch.compile(forward, mode="reduce-overhead" if graphs else None, dynamic=False)

    def step():
        if graphs:  # a new iteration: the graphs' previous outputs may be overwritten
            torch.compiler.cudagraph_mark_step_begin()
        loss = forward(x)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()
    return step


# ---- measuring --------------------------------------------------------------------


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step, device, warmup=3, min_steps=5, max_steps=50, min_seconds=0.5):
    """Steps per second after ``warmup`` steps (compilation and CUDA-graph
    recording happen there): at least ``min_steps``, until ``min_seconds`` pass or
    ``max_steps`` ran; also the first call's seconds and the last loss."""
    start = time.perf_counter()
    loss = step()
    _sync(device)
    first_s = time.perf_counter() - start
    for _ in range(warmup - 1):
        loss = step()
    _sync(device)
    steps, start = 0, time.perf_counter()
    while steps < min_steps or (steps < max_steps and time.perf_counter() - start < min_seconds):
        loss = step()
        steps += 1
    _sync(device)
    elapsed = time.perf_counter() - start
    return dict(steps_per_s=steps / elapsed, timed_steps=steps, first_call_s=first_s,
                loss=float(loss))


def phase_device_time(ranges, launches):
    """Device microseconds per phase.

    ``ranges``: (phase, start_us, end_us) host-time windows in which the step ran
    that phase (they do not overlap: the main thread blocks in each backward);
    ``launches``: (start_us, device_us) for every profiled host event, its start
    and the device time of the kernels it launched itself. A launch counts for
    the phase whose window holds its start (backward work runs on autograd's
    device thread, inside the window of the call that waits for it), else
    for "other". Returns {phase: us} including "other"."""
    ordered = sorted(ranges, key=lambda r: r[1])
    out = {phase: 0.0 for phase, _, _ in ordered}
    out["other"] = 0.0
    starts = [r[1] for r in ordered]
    for start, device_us in launches:
        if not device_us:
            continue
        i = bisect.bisect_right(starts, start) - 1
        if i >= 0 and start <= ordered[i][2]:
            out[ordered[i][0]] += device_us
        else:
            out["other"] += device_us
    return out


PHASE_PREFIX = "fastvae_phase:"


def phased_step(impl, variant, model, x, recon, beta):
    """The same step cut at the model's outputs so each phase is timed on its own:
    model (encoder, decoder and their backward), loss+sampling (the sampling, the
    loss and their backward) and optimizer. Detached leaves join the pieces: the
    gradients and the numbers are the step's (``test_train_steps`` checks this)."""
    from torch.profiler import record_function

    device = x.device
    fused = device.type == "cuda"
    opt = torch.optim.Adam(model.parameters(), lr=1e-4, fused=fused, foreach=not fused)
    sample, loss_fn = sampler(impl), criterion(impl, recon, beta)
    leaf = lambda t: t.detach().requires_grad_()  # noqa: E731

    def step():
        with record_function(PHASE_PREFIX + "model"), _autocast(variant, device):
            mu, logvar = model.encode(x)
        mu_s, logvar_s = leaf(mu), leaf(logvar)
        with record_function(PHASE_PREFIX + "loss+sampling"), _autocast(variant, device):
            z = sample(mu_s, logvar_s)
        z_leaf = leaf(z)
        with record_function(PHASE_PREFIX + "model"), _autocast(variant, device):
            x_hat = model.decoder(z_leaf)
        x_hat_l, mu_l, logvar_l = leaf(x_hat), leaf(mu), leaf(logvar)
        with record_function(PHASE_PREFIX + "loss+sampling"):
            with _autocast(variant, device):
                loss = loss_fn(x_hat_l, x, mu_l, logvar_l)
            loss.backward()
        with record_function(PHASE_PREFIX + "model"):
            x_hat.backward(x_hat_l.grad)
        with record_function(PHASE_PREFIX + "loss+sampling"):
            z.backward(z_leaf.grad)
        with record_function(PHASE_PREFIX + "model"):
            torch.autograd.backward([mu, logvar], [mu_l.grad + mu_s.grad,
                                                   logvar_l.grad + logvar_s.grad])
        with record_function(PHASE_PREFIX + "optimizer"):
            opt.step()
            opt.zero_grad(set_to_none=True)
        return loss.detach()
    return step


def profile_records(prof):
    """(ranges, launches) for ``phase_device_time`` from a finished torch.profiler run."""
    ranges, launches = [], []
    for evt in prof.events():
        if str(evt.device_type).rsplit(".", 1)[-1] != "CPU":
            continue
        if evt.name.startswith(PHASE_PREFIX):
            ranges.append((evt.name[len(PHASE_PREFIX):], evt.time_range.start, evt.time_range.end))
        launches.append((evt.time_range.start, sum(k.duration for k in getattr(evt, "kernels", []))))
    return ranges, launches


def profile_shares(impl, variant, model, x, recon, beta, steps=3):
    """Share of the device time per phase over ``steps`` phased steps (after one
    warm-up step), with the total device milliseconds per step."""
    from torch.profiler import ProfilerActivity, profile

    step = phased_step(impl, variant, model, x, recon, beta)
    step()
    _sync(x.device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if x.is_cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        _sync(x.device)
    per_phase = phase_device_time(*profile_records(prof))
    total = sum(per_phase.values())
    return dict(device_ms_per_step=total / steps / 1e3,
                share={k: (v / total if total else None) for k, v in per_phase.items()})


def peak_memory_mib(step, device):
    """Peak allocated memory over one step, model and optimizer state included (None off CUDA)."""
    if torch.device(device).type != "cuda":
        return None
    _sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    _sync(device)
    return torch.cuda.max_memory_allocated(device) / 2**20


def run_group(device, models=MODELS, variants=VARIANTS, small=False, time_left=None,
              profile_variants=("eager", "bf16"), log=print, rows=None, **timing):
    """Measure every (model, variant, impl): a list of row dicts, appended to
    ``rows`` as they are measured (then ``log`` is called with a summary line).
    ``time_left``: a callable giving the seconds left; a row is skipped (recorded,
    with the reason) when fewer than its estimate remain. Each row starts from
    the same weights."""
    rows = [] if rows is None else rows
    for model_name in models:
        base, x, recon, beta = build(model_name, device, small=small)
        for variant in variants:
            for impl in IMPLS:
                row = dict(model=model_name, variant=variant, impl=impl, batch=x.shape[0])
                rows.append(row)
                step = None
                need = 45 if variant in ("compile", "reduce-overhead") else 10
                if time_left is not None and time_left() < need:
                    row["skipped"] = f"time budget ({need} s needed)"
                    log(f"train step {model_name} {variant} {impl}: " + _row_summary(row))
                    continue
                try:
                    model = copy.deepcopy(base)
                    if variant in ("compile", "reduce-overhead"):
                        torch._dynamo.reset()
                    step = make_step(impl, variant, model, x, recon, beta)
                    skips = _cudagraph_skips()
                    row.update(time_steps(step, device, **timing))
                    if variant in ("compile", "reduce-overhead"):
                        row["cudagraph_skips"] = _cudagraph_skips() - skips
                    row["peak_mib"] = peak_memory_mib(step, device)
                    if variant in profile_variants:
                        row.update(profile_shares(impl, variant, copy.deepcopy(base), x, recon, beta))
                except Exception as e:  # noqa: BLE001 - one failed row must not end the group
                    row["error"] = f"{type(e).__name__}: {e}"[:500]
                log(f"train step {model_name} {variant} {impl}: " + _row_summary(row))
                del step
                if torch.device(device).type == "cuda":
                    torch.cuda.empty_cache()
    return rows


def _cudagraph_skips():
    """Inductor's count of graphs that ran without CUDA graphs ("skipping cudagraphs due to ...")."""
    from torch._dynamo.utils import counters

    return counters["inductor"]["cudagraph_skips"]


def _row_summary(row):
    if "skipped" in row or "error" in row:
        return row.get("skipped") or row["error"]
    share = (row.get("share") or {}).get("loss+sampling")
    return (f"{row['steps_per_s']:.1f} steps/s, peak {_fmt(row.get('peak_mib'), '.0f')} MiB"
            + ("" if share is None else f", loss+sampling {100 * share:.0f}% of device time")
            + (f", {row['cudagraph_skips']} cudagraph skips" if row.get("cudagraph_skips") else ""))


# ---- the table and the targets -------------------------------------------------------


def _fmt(value, spec):
    return "-" if value is None else format(value, spec)


def pairs(rows):
    """{(model, variant): {impl: row}} of the rows that were measured."""
    out = {}
    for row in rows:
        if "steps_per_s" in row:
            out.setdefault((row["model"], row["variant"]), {})[row["impl"]] = row
    return out


def evaluate(rows):
    """The issue's goals: fastvae >= 1.0x its counterpart in every pair, and the
    fastest row of each model uses fastvae. [{what, measured, wanted, met}]."""
    out = []
    for (model, variant), by_impl in pairs(rows).items():
        if set(by_impl) == set(IMPLS):
            speedup = by_impl["fastvae"]["steps_per_s"] / by_impl["plain"]["steps_per_s"]
            out.append(dict(what=f"train step {model} {variant}: fastvae / plain steps/s",
                            measured=speedup, wanted=1.0, met=speedup >= 1.0))
    for model in dict.fromkeys(r["model"] for r in rows):
        measured = [r for r in rows if r["model"] == model and "steps_per_s" in r]
        if not measured:
            continue
        best = max(measured, key=lambda r: r["steps_per_s"])
        out.append(dict(what=f"train step {model}: fastest row ({best['variant']} {best['impl']}) "
                             "uses fastvae", measured=1.0 if best["impl"] == "fastvae" else 0.0,
                        wanted=1.0, met=best["impl"] == "fastvae"))
    return out


def table(rows):
    """Markdown: one line per (model, variant), plain and fastvae side by side."""
    lines = ["| model | batch | run | steps/s plain | steps/s fastvae | fastvae / plain | "
             "peak MiB plain/fastvae | loss+sampling share plain/fastvae | first call s plain/fastvae |",
             "|---|---|---|---|---|---|---|---|---|"]
    keyed = {}
    for row in rows:
        keyed.setdefault((row["model"], row["variant"]), {})[row["impl"]] = row
    for (model, variant), by_impl in keyed.items():
        p, f = by_impl.get("plain", {}), by_impl.get("fastvae", {})
        sp, sf = p.get("steps_per_s"), f.get("steps_per_s")
        ratio = sf / sp if sp and sf else None
        share = [None if r.get("share") is None else r["share"].get("loss+sampling") for r in (p, f)]
        note = "; ".join(f"{impl}: {r.get('skipped') or r.get('error')}" for impl, r in
                         (("plain", p), ("fastvae", f)) if r.get("skipped") or r.get("error"))
        lines.append(
            f"| {model} | {p.get('batch', f.get('batch', '-'))} | {variant} | {_fmt(sp, '.1f')} | "
            f"{_fmt(sf, '.1f')} | {_fmt(ratio, '.2f')}x | {_fmt(p.get('peak_mib'), '.0f')}/"
            f"{_fmt(f.get('peak_mib'), '.0f')} | "
            f"{_fmt(None if share[0] is None else 100 * share[0], '.0f')}%/"
            f"{_fmt(None if share[1] is None else 100 * share[1], '.0f')}% | "
            f"{_fmt(p.get('first_call_s'), '.1f')}/{_fmt(f.get('first_call_s'), '.1f')} |"
            + (f" {note}" if note else ""))
    return lines


def main(argv=None):
    """``python -m benchmarks.train_steps``: the group alone, its table printed."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m benchmarks.train_steps",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--small", action="store_true", help="CPU-test sizes")
    args = parser.parse_args(argv)
    rows = run_group(torch.device(args.device), models=args.models, variants=args.variants,
                     small=args.small)
    print("\n".join(table(rows)))
    for target in evaluate(rows):
        print(f"{'met' if target['met'] else 'MISSED'}: {target['what']} "
              f"(measured {target['measured']:.2f}, wanted >= {target['wanted']})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
