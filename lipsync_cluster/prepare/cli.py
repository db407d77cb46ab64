"""``lipsync-cluster prepare`` and ``lipsync-cluster check-model`` (registered by lipsync_cluster.cli)."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import click


def _size(ctx, param, value):  # noqa: ARG001 - click callback signature
    from .video import parse_size  # noqa: PLC0415

    try:
        return parse_size(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


@click.command("prepare")
@click.argument("video_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("names", nargs=-1, metavar="[NAME]...")
@click.option("--models-dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Where the model packages go (MODELS_DIR/NAME/); a cluster's models_dir.")
@click.option("--workers", type=click.IntRange(1, 64), default=4, show_default=True,
              help="Videos prepared at once (processes).")
@click.option("--fps", type=click.FloatRange(0, 240, min_open=True), default=25.0, show_default=True,
              help="Frame rate of the prepared frames; frame i is the source frame at time i/fps.")
@click.option("--quality", type=click.IntRange(1, 100), default=85, show_default=True, help="JPEG quality of the frames.")
@click.option("--size", default="1280x720", show_default=True, callback=_size,
              help="Frame size WIDTHxHEIGHT (letterboxed: aspect kept, padded black), or 'source'.")
@click.option("--onnx", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="The UNet to put in every package (copied). Without it an existing package keeps its UNet; "
                   "a new one is prepared but not servable.")
@click.option("--crop-rects", type=click.Path(exists=True, path_type=Path),
              help="Face boxes instead of detection: a JSON file (one video) or a folder of NAME.json files. "
                   "One [x1,y1,x2,y2] per prepared frame, in prepared-frame coordinates.")
@click.option("--max-missing", type=click.FloatRange(0, 1), default=0.2, show_default=True,
              help="Fail a video when more than this fraction of its frames has no face.")
@click.option("--force", is_flag=True, help="Re-prepare even when a package is up to date (or was not made by prepare).")
@click.option("--output-json", type=click.Path(dir_okay=False, path_type=Path), help="Write the summary as JSON.")
@click.option("--progress/--no-progress", default=None, help="Progress bars (default: when stderr is a terminal).")
def prepare(video_dir: Path, names: tuple[str, ...], models_dir: Path, workers: int, fps: float, quality: int,
            size: Optional[tuple[int, int]], onnx: Optional[Path], crop_rects: Optional[Path], max_missing: float,
            force: bool, output_json: Optional[Path], progress: Optional[bool]) -> None:
    """Make servable model packages from videos of people: VIDEO_DIR/NAME.mp4 -> MODELS_DIR/NAME/.

    \b
    For each video (NAME.mp4/.avi/.mov/.mkv/.webm; only the NAMEs given, or all):
    frames resampled to --fps and letterboxed to --size, the face found in every frame and
    turned into a smooth SyncTalk_2D face box per frame, model.yaml written last. Up-to-date
    packages are skipped; one failing video does not stop the others; the exit code is 1
    when any failed.

    \b
    Examples:
      lipsync-cluster prepare model_videos --models-dir models --onnx unet_328.onnx
      lipsync-cluster prepare model_videos --models-dir models person_1 person_2 --workers 2
      lipsync-cluster prepare model_videos --models-dir models --force --output-json stats.json
    """
    from .batch import NameProblems, find_tasks, header, progress_default, report, result_line, run_tasks, summary
    from .build import Settings

    try:
        tasks = find_tasks(video_dir, names, crop_rects)
    except NameProblems as exc:
        for problem in exc.problems:
            click.echo(f"❌ {problem}", err=True)
        raise click.UsageError(f"{len(exc.problems)} problem(s) with the video names; nothing was prepared") from None
    if onnx is not None:
        from ..common.model_package import check_unet_onnx  # noqa: PLC0415

        problems = check_unet_onnx(onnx)
        if problems:
            raise click.BadParameter("; ".join(problems), param_hint="--onnx")
    models_dir.mkdir(parents=True, exist_ok=True)
    settings = Settings(models_dir=models_dir, fps=fps, quality=quality, size=size, onnx=onnx,
                        max_missing=max_missing, force=force)
    progress = progress_default() if progress is None else progress
    click.echo(header(tasks, video_dir, settings, workers))
    results = run_tasks(tasks, settings, workers=workers, progress=progress,
                        on_result=lambda r: click.echo(result_line(r)))
    click.echo(summary(results))
    if output_json is not None:
        output_json.parent.mkdir(parents=True, exist_ok=True)
        output_json.write_text(json.dumps(report(results, video_dir, settings, workers), indent=2) + "\n")
        click.echo(f"Statistics written to {output_json}")
    if any(not r.ok for r in results):
        sys.exit(1)


@click.command("check-model")
@click.argument("package_dir", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def check_model(package_dir: Path, as_json: bool) -> None:
    """Validate a model package and show what the cluster would load; exit 1 listing every problem.

    \b
    Examples:
      lipsync-cluster check-model models/person_1
      lipsync-cluster check-model models/person_1 --json
    """
    from .check import check_package, format_check

    result = check_package(package_dir)
    click.echo(json.dumps(result, indent=2, default=str) if as_json else format_check(result))
    if not result["ok"]:
        sys.exit(1)


__all__ = ["prepare", "check_model"]
