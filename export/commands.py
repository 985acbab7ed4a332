"""``cnnctl export``: the click command. Heavy imports (torch, onnx) happen inside the command."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import click

from cnnctl.export.manifest import NAME_RULE, is_safe_name, shown

# The ONNX exporter's optimiser logs every pass at INFO; that is debug detail for cnnctl users.
_CHATTY = ("onnxscript", "onnx_ir")


def _safe_name(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """Served names and versions go into URLs, directory names and log lines: a safe set only."""
    if value is not None and not is_safe_name(value):
        raise click.BadParameter(f"{shown(value)} is not allowed; allowed: {NAME_RULE}")
    return value


@click.command("export")
@click.argument("checkpoint", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--format", "format_", type=click.Choice(["onnx", "torchscript", "all", "triton"]),
              default="all", show_default=True,
              help="Files to write; triton = ONNX plus a Triton model repository.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Artifact directory [default: artifacts/<name>].")
@click.option("--opset", type=int, default=None, help="ONNX opset [default: the exporter's].")
@click.option("--precision", type=click.Choice(["fp32", "fp16", "int8"]), default="fp32",
              show_default=True, help="fp16/int8 add that ONNX file beside the fp32 one.")
@click.option("--triton", is_flag=True, help="Also lay out a Triton model repository.")
@click.option("--calibration-dataset", default=None,
              help="int8 calibration images [default: the checkpoint's dataset].")
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where datasets live (torchvision layout); never downloaded by export.")
@click.option("--verify-dataset", default=None,
              help="Held-out images to verify on [default: the checkpoint's dataset].")
@click.option("--verify-images", type=click.IntRange(1), default=2000, show_default=True,
              help="How many held-out images to verify on.")
@click.option("--model", "model_name", default=None,
              help="Model name, to export a bare state_dict (a seed script's file).")
@click.option("--name", default=None, callback=_safe_name,
              help="Served model name [default: the model name].")
@click.option("--version", "version", default="1", show_default=True, callback=_safe_name,
              help="Model version.")
@click.option("--force", is_flag=True, help="Replace a non-empty output directory.")
@click.option("--verify-only", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Re-verify this existing artifact directory against CHECKPOINT; write nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a table.")
def export(checkpoint: Path, format_: str, out_dir: Path | None, opset: int | None,
           precision: str, triton: bool, calibration_dataset: str | None, data_dir: Path | None,
           verify_dataset: str | None, verify_images: int, model_name: str | None,
           name: str | None, version: str, force: bool, verify_only: Path | None,
           as_json: bool) -> None:
    """Export CHECKPOINT to verified ONNX/TorchScript files plus manifest.json.

    Every file is checked against eager PyTorch on random and real held-out images; if any check
    fails, nothing is written and the command exits with status 2.
    """
    from cnnctl.export.api import export_checkpoint, verify_artifact_dir
    from cnnctl.export.verify import format_table

    if logging.getLogger().getEffectiveLevel() > logging.DEBUG:
        for chatty in _CHATTY:
            logging.getLogger(chatty).setLevel(logging.WARNING)

    if verify_only is not None:
        report = verify_artifact_dir(
            verify_only, checkpoint, model_name=model_name, data_dir=data_dir,
            verify_dataset=verify_dataset, verify_images=verify_images)
        if as_json:
            click.echo(json.dumps({"artifact_dir": str(verify_only), "verification": report}))
        else:
            click.echo(format_table(report))
            click.echo(f"{verify_only}: verified")
        return

    manifest = export_checkpoint(
        checkpoint, out_dir, format_, opset, precision, model_name=model_name, name=name,
        version=version, triton=triton, calibration_dataset=calibration_dataset,
        data_dir=data_dir, verify_dataset=verify_dataset, verify_images=verify_images,
        force=force,
    )
    from cnnctl.export.api import default_out_dir

    where = out_dir if out_dir is not None else default_out_dir(manifest.name)
    if as_json:
        click.echo(json.dumps({"artifact_dir": str(where), "manifest": manifest.to_json()}))
        return
    click.echo(format_table(manifest.verification))
    for f in manifest.files:
        click.echo(f"  {f.path:<18} {f.format:<12} {f.precision:<5} {f.bytes:>11,} B  "
                   f"sha256 {f.sha256[:12]}")
    if manifest.triton:
        click.echo(f"  triton repository: {where / manifest.triton['repository']}")
    click.echo(f"wrote {where} (model {manifest.model}, name {manifest.name}, "
               f"version {manifest.version}, opset {manifest.opset})")
