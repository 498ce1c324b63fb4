"""The ``fastvae export`` command: a checkpoint of ``fastvae train`` to an ONNX directory."""

import os

from fastvae import runtime as _rt
from fastvae.onnx import MIN_OPSET, ExportParityError, _max_opset, export


def add_arguments(parser):
    parser.add_argument("checkpoint", help="checkpoint written by `fastvae train`")
    parser.add_argument("--out", required=True, help="directory to write the export to")
    parser.add_argument("--parts", default=",".join(_rt.PARTS),
                        help="comma-separated parts to export (default: %(default)s)")
    parser.add_argument("--opset", type=int, default=None,
                        help=f"ONNX opset, {MIN_OPSET} to the installed onnx's highest "
                             f"(default: the exporter's)")
    parser.add_argument("--batch", default="dynamic",
                        help="'dynamic' (default) or a fixed batch size")
    parser.add_argument("--quantize", action="store_true",
                        help="also write int8 (dynamic quantization) encoder/decoder")


def run(args):
    from fastvae.app.checkpoint import load_model

    batch = args.batch
    if batch != "dynamic":
        try:
            batch = int(batch)
        except ValueError:
            batch = 0
        if batch < 1:
            raise ValueError(f"--batch must be 'dynamic' or a positive int, got {args.batch!r}")
    highest = _max_opset()
    if args.opset is not None and not MIN_OPSET <= args.opset <= (highest or args.opset):
        upto = f"to {highest} (the installed onnx's highest)" if highest else "or more"
        raise ValueError(f"--opset must be from {MIN_OPSET} {upto}, got {args.opset}")
    parts = tuple(p.strip() for p in args.parts.split(",") if p.strip())
    model = load_model(args.checkpoint)
    if not model.is_vae:  # the export's encoder, scorer and sampling all need (mu, logvar)
        raise ValueError(f"only VAE checkpoints can be exported: {args.checkpoint} holds an "
                         f"autoencoder (--model ae), whose encoder gives no posterior (mu, logvar)")
    try:
        meta = export(model, args.out, parts=parts, opset=args.opset, batch=batch,
                      quantize=args.quantize)
    except (FileExistsError, ExportParityError) as err:
        raise ValueError(str(err)) from None
    for info in meta["parts"].values():
        print(f"{os.path.join(args.out, info['file'])}: max relative error vs PyTorch "
              f"{info['max_rel_err']:.2e}")
    for info in meta.get("quantized", {}).values():
        lat = info["latency_ms"]
        print(f"{os.path.join(args.out, info['file'])}: int8, max relative error "
              f"{info['max_rel_err']:.2e}, {lat['int8']:.3f} ms vs {lat['fp32']:.3f} ms fp32 "
              f"at batch {lat['batch']}")
    print(f"{os.path.join(args.out, _rt.METADATA_FILE)}: opset {meta['opset']}")
    return 0
