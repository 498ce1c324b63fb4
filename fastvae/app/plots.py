"""The demo's pictures, drawn with matplotlib's object API (no pyplot, no display)
and written atomically."""

import io

import numpy as np
from matplotlib.figure import Figure

from fastvae._io import atomic_write


def tile(images, cols):
    """(N, C, H, W) or (N, H, W) in [0, 1] -> one (rows*H, cols*W) grayscale mosaic,
    with a one-pixel gap between images."""
    images = np.asarray(images, dtype=np.float32)
    images = images.mean(1) if images.ndim == 4 else images  # channels -> gray
    n, h, w = images.shape
    rows = -(-n // cols)
    mosaic = np.ones((rows * (h + 1) - 1, cols * (w + 1) - 1), np.float32)
    for i, im in enumerate(images):
        r, c = divmod(i, cols)
        mosaic[r * (h + 1):r * (h + 1) + h, c * (w + 1):c * (w + 1) + w] = im
    return np.clip(mosaic, 0, 1)


def _save(fig, path):
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")

    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(buffer.getvalue())
    atomic_write(path, write)


def image_panels(path, panels, cols, title=None):
    """Side by side mosaics: ``panels`` is a list of (caption, images)."""
    fig = Figure(figsize=(4.2 * len(panels), 4.4))
    for i, (caption, images) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        ax.imshow(tile(images, cols), cmap="gray_r", vmin=0, vmax=1, interpolation="nearest")
        ax.set_title(caption, fontsize=10)
        ax.axis("off")
    if title:
        fig.suptitle(title)
    _save(fig, path)


def image_rows(path, rows, cols, title=None):
    """Stacked mosaics: ``rows`` is a list of (caption, images), one mosaic per row."""
    fig = Figure(figsize=(0.45 * cols + 1.2, 0.5 * sum(-(-len(im) // cols) for _, im in rows) + 0.3))
    for i, (caption, images) in enumerate(rows):
        ax = fig.add_subplot(len(rows), 1, i + 1)
        ax.imshow(tile(images, cols), cmap="gray_r", vmin=0, vmax=1, interpolation="nearest")
        ax.set_ylabel(caption, rotation=0, ha="right", va="center", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    if title:
        fig.suptitle(title)
    _save(fig, path)


def loss_curves(path, histories):
    """Per-epoch train and test loss of each model, and the VAE's recon / KL split."""
    fig = Figure(figsize=(10, 3.6))
    ax_loss, ax_parts = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    for name, history in histories.items():
        epochs = [h["epoch"] for h in history]
        ax_loss.plot(epochs, [h["loss"] for h in history], label=f"{name} train")
        ax_loss.plot(epochs, [h["test_loss"] for h in history], "--",
                     label=f"{name} test (no sampling)")
        if any(h["kl"] for h in history):
            ax_parts.plot(epochs, [h["recon"] for h in history], label=f"{name} recon")
            ax_parts.plot(epochs, [h["kl"] for h in history], label=f"{name} KL")
    ax_loss.set(xlabel="epoch", ylabel="loss per image (nats)", title="loss")
    ax_parts.set(xlabel="epoch", ylabel="nats per image", title="VAE: reconstruction and KL")
    for ax in (ax_loss, ax_parts):
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    _save(fig, path)
