"""``lipsync-cluster demo-models``: write demo model packages and a ready config."""
from __future__ import annotations

import re
import shlex
import time
from pathlib import Path

import click

_SIZE_RE = re.compile(r"^\s*(\d+)\s*[xX]\s*(\d+)\s*$")


def _parse_size(ctx, param, value) -> tuple[int, int]:
    if isinstance(value, tuple):
        return value
    m = _SIZE_RE.match(str(value))
    if not m:
        raise click.BadParameter(f"--size must look like 1280x720 (width x height), got {value!r}")
    width, height = int(m.group(1)), int(m.group(2))
    if width < 64 or height < 64 or width > 7680 or height > 4320:
        raise click.BadParameter(f"--size {width}x{height} is out of range: width and height 64..7680 x 64..4320")
    return width, height


@click.command("demo-models")
@click.argument("out_dir", type=click.Path(file_okay=False, dir_okay=True, writable=True, path_type=Path))
@click.option("--count", type=click.IntRange(1, 1000), default=3, show_default=True,
              help="How many models (one synthetic person each).")
@click.option("--kind", type=click.Choice(["light", "unet"]), default="light", show_default=True,
              help="light: a tiny UNet that opens a drawn mouth with the audio (fast on CPU). "
                   "unet: the SyncTalk_2D 328 topology, ~12 M random weights (real cost, noise-like output).")
@click.option("--frames", type=click.IntRange(1, 100000), default=100, show_default=True,
              help="Background frames per model (25 fps).")
@click.option("--size", default="1280x720", show_default=True, callback=_parse_size, metavar="WxH",
              help="Frame size, width x height.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for the people and the UNet weights.")
@click.option("--force", is_flag=True, help="Rebuild packages (and cluster.yaml) even if they are already there.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars.")
def demo_models(out_dir: Path, count: int, kind: str, frames: int, size: tuple[int, int], seed: int,
                force: bool, quiet: bool) -> None:
    """Write demo model packages (synthetic people, honest ONNX models) and a ready cluster.yaml.

    No real weights are needed: each package holds a drawn person's background frames, their face
    boxes, a UNet with the real SyncTalk_2D inputs and outputs, and a manifest. OUT_DIR also gets
    the shared audio encoder and a cluster.yaml that serves every package in it.

    \b
    Examples:
      lipsync-cluster demo-models demo_models
      lipsync-cluster demo-models demo_models --count 5 --kind light --frames 250
      lipsync-cluster demo-models bench_models --kind unet --count 2 --size 1920x1080
      lipsync-cluster start --config demo_models/cluster.yaml --gpus 0 --per-gpu 2

    Packages already built with the same settings are kept (use --force to rebuild).
    """
    from .build import build_demo_models_report

    started = time.monotonic()
    try:
        result = build_demo_models_report(out_dir, count=count, kind=kind, frames=frames, size=size, seed=seed,
                                          force=force, progress=not quiet)
    except (OSError, ValueError) as exc:
        raise click.ClickException(f"could not write demo models to {out_dir}: {exc}") from None
    elapsed = time.monotonic() - started
    ids = [p.name for p in result.packages]
    parts = [f"{len(result.built)} written"]
    if result.skipped:
        parts.append(f"{len(result.skipped)} already there (same settings; --force rebuilds them)")
    click.echo(f"Demo models in {out_dir}/: {', '.join(ids)}")
    label = {"light": "light UNet", "unet": "SyncTalk_2D-topology UNet"}[kind]
    click.echo(f"  {'; '.join(parts)}; {label}, {frames} frames at {size[0]}x{size[1]} each, "
               f"in {elapsed:.1f} s")
    click.echo(f"  config: {result.cluster_yaml}   audio encoder: {result.audio_encoder}")
    from ..common.invocation import cli_command

    click.echo("Next:")  # this interpreter's own entry point: works as pasted, venv activated or not
    click.echo(f"  {cli_command()} start --config {shlex.quote(str(out_dir / 'cluster.yaml'))} --gpus 0 --per-gpu 2")
