"""``fastvae demo`` (what ``make demo`` runs): an autoencoder vs a VAE on digits.

Both models get the same architecture, latent size, optimiser and epochs on
scikit-learn's bundled digits (no download). Then, for each:

- ``test_recon``: binary cross-entropy (nats per image) of its reconstructions
  of the test digits;
- generation from the prior, z ~ N(0, I), judged by a classifier trained on the
  real training digits: ``sample_confidence`` (mean max class probability),
  ``sample_coverage`` (normalised entropy of the predicted classes) and ``fid``
  (Fréchet distance between the classifier's features of the samples and of the
  test digits);
- ``auroc``: its per-sample score separating test digits from corrupted (10% of
  pixels replaced by noise) and mirrored (left-right) test digits;
- latent regularity: ``aggregate_kl`` (KL from N(0, I) of the Gaussian fitted to
  the test codes: how well the prior describes where codes really are),
  ``posterior_kl`` for the VAE, and ``interp_confidence`` (classifier confidence
  along straight lines between test digits' codes).

It writes report.md, metrics.json, PNGs, the checkpoints and the ONNX export of
the VAE (checked in onnxruntime against PyTorch) into ``--out``.
"""

import dataclasses
import json
import os
import time
from dataclasses import asdict

import torch
import torch.nn.functional as F

from fastvae import _io
from fastvae.app import checkpoint, metrics, plots
from fastvae.app.data import load_data
from fastvae.app.train import TrainConfig, check_seed, fit, pick_device
from fastvae.functional import kl_divergence
from fastvae.models import BY_KIND

PAIRS, STEPS = 10, 9  # interpolations: test-digit pairs, points per line
FILES = {"samples": "samples.png", "recon": "reconstructions.png",
         "interp": "interpolations.png", "curves": "loss_curves.png"}


def make_ood(test, generator):
    """Out-of-distribution inputs made from the test digits: noise-corrupted ones and
    mirrored ones (some digits, like 0, 1 and 8, stay plausible when mirrored)."""
    noise = torch.rand(test.shape, generator=generator)
    replace = torch.rand(test.shape, generator=generator) < 0.10
    return torch.where(replace, noise, test), torch.flip(test, dims=(-1,))


def interpolate(model, a, b):
    """Decode straight lines between the codes of images ``a`` and ``b`` (PAIRS each)."""
    code = (lambda x: model.encode(x)[0]) if model.is_vae else model.encode
    za, zb = code(a), code(b)
    t = torch.linspace(0, 1, STEPS)[None, :, None]
    z = (1 - t) * za[:, None] + t * zb[:, None]  # (PAIRS, STEPS, latent)
    return model.decode(z.flatten(0, 1))


@torch.no_grad()
def measure(model, data, judge, ood, n_samples, seed):
    """The comparison's numbers for one trained model (on the CPU)."""
    gen = torch.Generator().manual_seed(seed)
    test = data.test
    recon = model.reconstruct(test)
    samples = model.sample(n_samples, generator=gen)
    probs = judge.probs(samples)
    scores_in = model.score(test)
    scores_corrupt, scores_mirrored = model.score(ood[0]), model.score(ood[1])
    if model.is_vae:
        mu, logvar = model.encode(test)
        codes = mu + torch.exp(0.5 * logvar) * torch.randn(mu.shape, generator=gen)
    else:
        codes = model.encode(test)
    a, b = test[:PAIRS], test[PAIRS:2 * PAIRS]
    lines = interpolate(model, a, b).view(PAIRS, STEPS, *test.shape[1:])
    result = {
        "test_recon": F.binary_cross_entropy(recon, test, reduction="sum").item() / len(test),
        "sample_confidence": probs.max(1).values.mean().item(),
        "sample_coverage": metrics.class_coverage(probs.numpy()),
        "fid": metrics.frechet_distance(judge.features(samples).numpy(),
                                        judge.features(test).numpy()),
        "auroc": metrics.auroc(scores_in.numpy(), torch.cat([scores_corrupt, scores_mirrored]).numpy()),
        "auroc_corrupted": metrics.auroc(scores_in.numpy(), scores_corrupt.numpy()),
        "auroc_mirrored": metrics.auroc(scores_in.numpy(), scores_mirrored.numpy()),
        "aggregate_kl": metrics.gaussian_kl_to_prior(codes.numpy()),
        "interp_confidence": judge.probs(lines[:, 1:-1].flatten(0, 1)).max(1).values.mean().item(),
    }
    if model.is_vae:
        result["posterior_kl"] = kl_divergence(mu, logvar, reduction="batchmean").item()
    pictures = {"samples": samples[:100], "recon": recon[:20], "lines": lines.flatten(0, 1)}
    return result, pictures


def export_onnx(vae, test, out_dir, seed):
    """Export the VAE and compare onnxruntime with PyTorch on real test digits."""
    from fastvae.onnx import export, relative_error
    from fastvae.runtime import VAERuntime

    meta = export(vae, out_dir)
    runtime = VAERuntime(out_dir)
    z = torch.randn(256, *vae.latent_shape, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        mu, logvar = vae.encode(test)
        pairs = {"encoder_mu": (runtime.encode(test.numpy())[0], mu),
                 "encoder_logvar": (runtime.encode(test.numpy())[1], logvar),
                 "decoder": (runtime.decode(z.numpy()), vae.decode(z)),
                 "scorer": (runtime.score(test.numpy()), vae.score(test))}
    errors = {name: relative_error(got, want.numpy()) for name, (got, want) in pairs.items()}
    export_errors = {part: info["max_rel_err"] for part, info in meta["parts"].items()}
    return errors, export_errors


def _better(ae, vae, key, higher_is_better):
    """"AE", "VAE", or "tie" when they agree to the 4 digits the table shows."""
    if f"{ae[key]:.4g}" == f"{vae[key]:.4g}":
        return "tie"
    return "VAE" if (vae[key] > ae[key]) == higher_is_better else "AE"


def _summary(ae, vae):
    """One paragraph on what the measured numbers show; each claim follows the numbers."""
    gen = _better(ae, vae, "fid", False)
    text = [f"Decoding z ~ N(0, I), the Fréchet distance of the samples to the test digits is "
            f"{vae['fid']:.3g} for the VAE and {ae['fid']:.3g} for the AE (judge confidence "
            f"{vae['sample_confidence']:.3f} vs {ae['sample_confidence']:.3f}, class coverage "
            f"{vae['sample_coverage']:.3f} vs {ae['sample_coverage']:.3f}): "
            + ("the two generate equally well." if gen == "tie" else
               f"the {gen} generates digits closer to real ones.")]
    if ae["aggregate_kl"] > vae["aggregate_kl"]:
        text.append(f"The latent KL column shows why: the Gaussian fitted to the AE's test codes "
                    f"is {ae['aggregate_kl']:.3g} nats from N(0, I), the VAE's "
                    f"{vae['aggregate_kl']:.3g}, so the prior describes where the VAE's codes "
                    f"lie better than where the AE's lie.")
    rec = _better(ae, vae, "test_recon", False)
    text.append(f"Reconstruction of test digits: {ae['test_recon']:.3g} (AE) vs "
                f"{vae['test_recon']:.3g} (VAE) nats per image"
                + (f"; the VAE pays for a regular latent space (posterior KL "
                   f"{vae['posterior_kl']:.3g} nats per image) with reconstruction loss."
                   if rec == "AE" else "."))
    text.append(f"Anomaly detection by score: AUROC {ae['auroc']:.3f} (AE) vs {vae['auroc']:.3f} (VAE).")
    return " ".join(text)


def write_report(path, results, cfg_text, accuracy):
    ae, vae = results["ae"], results["vae"]
    rows = [("test_recon", "test reconstruction BCE, nats/image", False),
            ("sample_confidence", "prior samples: judge's mean confidence", True),
            ("sample_coverage", "prior samples: class coverage (0-1)", True),
            ("fid", "prior samples: Fréchet distance to test digits", False),
            ("auroc", "anomaly AUROC, digits vs corrupted+mirrored", True),
            ("auroc_corrupted", "  ... vs corrupted digits", True),
            ("auroc_mirrored", "  ... vs mirrored digits", True),
            ("aggregate_kl", "KL(fit of test codes ‖ N(0, I)), nats", False),
            ("interp_confidence", "judge's confidence along interpolations", True)]
    table = ["| metric | AE | VAE | better |", "|---|---:|---:|:---:|"]
    for key, label, higher in rows:
        table.append(f"| {label} (`{key}`) | {ae[key]:.4g} | {vae[key]:.4g} | "
                     f"{_better(ae, vae, key, higher)} |")
    paragraph = _summary(ae, vae)
    onnx = results["onnx_max_rel_err"]
    lines = ["# fastvae demo: autoencoder vs VAE on digits", "", cfg_text, "",
             f"Judge: an MLP classifier trained on the training digits, test accuracy "
             f"{accuracy:.3f}.", "", *table, "", paragraph, "",
             "## Samples from the prior", "", f"![samples]({FILES['samples']})", "",
             "## Reconstructions (test digits, AE, VAE)", "",
             f"![reconstructions]({FILES['recon']})", "",
             "## Interpolations between test digits", "", f"![interpolations]({FILES['interp']})",
             "", "## Training", "", f"![loss curves]({FILES['curves']})", "",
             "## ONNX", "",
             f"The VAE is exported to `onnx/`; onnxruntime vs PyTorch on the test digits, max "
             f"relative error {onnx:.2e} (per output: "
             + ", ".join(f"{k} {v:.1e}" for k, v in results["onnx_rel_err"].items()) + ").", ""]
    _io.atomic_write_text(path, "\n".join(lines))


def draw(path, test, pictures, histories):
    ae, vae = pictures["ae"], pictures["vae"]
    plots.image_panels(path(FILES["samples"]), [("AE: decoded z ~ N(0, I)", ae["samples"]),
                                                ("VAE: decoded z ~ N(0, I)", vae["samples"])],
                       cols=10)
    plots.image_rows(path(FILES["recon"]), [("test", test[:20]), ("AE", ae["recon"]),
                                            ("VAE", vae["recon"])], cols=20)
    plots.image_panels(path(FILES["interp"]), [("AE: lines between codes", ae["lines"]),
                                               ("VAE: lines between means", vae["lines"])],
                       cols=STEPS)
    plots.loss_curves(path(FILES["curves"]), {k.upper(): h for k, h in histories.items()})


def add_arguments(parser):
    a = parser.add_argument
    a("--out", default="runs/demo",
      help="output directory, its files replaced by each run (default: runs/demo)")
    a("--arch", choices=("mlp", "conv"), default="mlp", help="architecture of both models")
    a("--epochs", type=int, default=200)
    a("--latent-dim", type=int, default=8)
    a("--samples", type=int, default=2000, help="prior samples judged per model")
    a("--seed", type=int, default=0)
    a("--device", default="auto", help="training device: auto, cpu, cuda")
    a("--quick", action="store_true", help="a few epochs and samples: checks the pipeline only")
    a("--no-progress", action="store_true")


def run(args):
    start = time.time()
    if args.quick:
        args.epochs, args.samples = min(args.epochs, 3), min(args.samples, 200)
    if args.epochs < 1:  # (named as the command line names it, not as TrainConfig does)
        raise ValueError(f"--epochs must be >= 1, got {args.epochs}")
    if args.samples < 10:
        raise ValueError(f"--samples must be >= 10 (Fréchet distance needs a covariance), "
                         f"got {args.samples}")
    cfg = TrainConfig(epochs=args.epochs, anneal="linear", anneal_epochs=max(1, args.epochs / 5),
                      seed=args.seed, save_every=args.epochs)
    device = pick_device(args.device)
    if args.latent_dim < 1:  # (before anything is written; the models would refuse it later)
        raise ValueError(f"--latent-dim must be >= 1, got {args.latent_dim}")
    check_seed(args.seed)
    out = checkpoint.prepare_dir(args.out)
    # the export folder is checked before minutes of training, not after them
    from fastvae.onnx import _check_out_dir
    try:
        _check_out_dir(os.path.join(out, "onnx"))
    except (FileExistsError, NotADirectoryError) as err:
        raise ValueError(f"--out {args.out}: {err}") from None
    if device.type == "cpu":
        # The models are tiny: with more threads each small op waits on the others.
        torch.set_num_threads(1)

    data = load_data("digits")
    judge = metrics.train_classifier(data.train, data.train_labels, epochs=5 if args.quick else 60,
                                     seed=args.seed)
    accuracy = (judge.probs(data.test).argmax(1) == data.test_labels).float().mean().item()
    ood = make_ood(data.test, torch.Generator().manual_seed(args.seed))

    results, pictures, histories, models = {}, {}, {}, {}
    for kind in ("ae", "vae"):
        torch.manual_seed(args.seed)
        model = BY_KIND[(kind, args.arch)](data.input_shape, latent_dim=args.latent_dim)
        # (the autoencoder has no KL to anneal: its checkpoint records none, so that
        # `fastvae train --resume` takes it as it takes a --model ae run)
        run_cfg = cfg if kind == "vae" else dataclasses.replace(cfg, anneal="none")
        histories[kind] = fit(model, data, run_cfg, out=os.path.join(out, "checkpoints", kind),
                              device=device, progress=not args.no_progress)
        models[kind] = model.cpu().eval()
        results[kind], pictures[kind] = measure(models[kind], data, judge, ood, args.samples,
                                                args.seed)
    errors, export_errors = export_onnx(models["vae"], data.test, os.path.join(out, "onnx"),
                                        args.seed)
    results.update(onnx_max_rel_err=max(errors.values()), onnx_rel_err=errors,
                   onnx_export_parity=export_errors, judge_test_accuracy=accuracy,
                   settings={"arch": args.arch, "latent_dim": args.latent_dim,
                             "epochs": args.epochs, "samples": args.samples, "seed": args.seed,
                             "device": str(device), "quick": args.quick,
                             "train": asdict(cfg)})

    path = lambda name: os.path.join(out, name)  # noqa: E731
    draw(path, data.test, pictures, histories)
    results["seconds"] = time.time() - start
    _io.atomic_write_text(path("metrics.json"), json.dumps(results, indent=2) + "\n")
    cfg_text = (f"Both models: `{args.arch}` architecture, latent dim {args.latent_dim}, "
                f"{args.epochs} epochs of Adam (lr {cfg.lr}, batch {cfg.batch_size}), seed "
                f"{args.seed}; the VAE's β ramps linearly from 0 to {cfg.beta} over "
                f"{cfg.anneal_epochs:g} epochs. {args.samples} prior samples per model. "
                f"Run time {results['seconds']:.0f} s on {device}.")
    write_report(path("report.md"), results, cfg_text, accuracy)

    print("\n" + "\n".join(f"{m:>18}: AE {results['ae'][m]:8.4g}   VAE {results['vae'][m]:8.4g}"
                           for m in ("test_recon", "sample_confidence", "sample_coverage", "fid",
                                     "auroc", "aggregate_kl")))
    print(f"{'onnx_max_rel_err':>18}: {results['onnx_max_rel_err']:.2e}\n")
    for name in ["report.md", "metrics.json", *FILES.values(), "onnx", "checkpoints/ae",
                 "checkpoints/vae"]:
        print(f"wrote {path(name)}")
    return 0
