"""The `leccr-pipe` command line. It only builds configs and prints reports: each stage's logic
lives in its own module with a `run(config) -> report` entry. Heavy libraries (torch, ray,
vllm) are imported inside the stages, so `leccr-pipe --help` stays instant.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, List, Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="LECCR at scale: MLLM descriptions, machine translation, training, evaluation.")

EXIT_FATAL = 1        # fatal engine error, or more errors than --max-error-rate
EXIT_BAD_INPUT = 2    # the whole input is unusable


def _fail(code: int, message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def _parse_engine_args(pairs: list[str]) -> dict[str, Any]:
    """KEY=VALUE pairs; VALUE parsed as JSON when it is JSON (numbers, booleans, objects)."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            _fail(EXIT_BAD_INPUT, f"--engine-arg expects KEY=VALUE, got {pair!r}")
        try:
            out[key] = json.loads(raw)
        except json.JSONDecodeError:
            out[key] = raw
    return out


def _select_views(names: Optional[str], extra: list[str], views_file: Optional[Path]):
    from pipelines.describe import DEFAULT_VIEWS, View, load_views_file
    available, sampling = (load_views_file(views_file) if views_file else (DEFAULT_VIEWS, {}))
    by_name = {v.name: v for v in available}
    for spec in extra:
        name, sep, prompt = spec.partition("=")
        if not sep or not name.strip() or not prompt.strip():
            _fail(EXIT_BAD_INPUT, f"--view expects NAME=PROMPT, got {spec!r}")
        by_name[name.strip()] = View(name.strip(), prompt.strip())
    if names:
        wanted = [n.strip() for n in names.split(",") if n.strip()]
        unknown = [n for n in wanted if n not in by_name]
        if unknown:
            _fail(EXIT_BAD_INPUT, f"unknown view(s) {', '.join(unknown)}; known: {', '.join(by_name)}")
        chosen = [by_name[n] for n in wanted]
    else:
        chosen = list(by_name.values())
    bad = [v.name for v in chosen if "," in v.name or "/" in v.name]
    if bad:
        _fail(EXIT_BAD_INPUT, f"view names may not contain ',' or '/': {bad}")
    return tuple(chosen), sampling


@app.command()
def ingest(
    input: Path = typer.Option(..., "--input", help="COCO-style folder or any folder of images/videos."),
    workdir: Path = typer.Option(..., help="Working folder shared by all stages."),
    dataset: Optional[str] = typer.Option(None, help="Dataset name used in item ids (default: input folder name)."),
    annotations: List[Path] = typer.Option([], help="COCO captions JSON (repeatable; default: input/annotations/captions*.json)."),
    media_root: Optional[Path] = typer.Option(None, help="Folder the COCO file_names are relative to (default: input)."),
) -> None:
    """Write workdir/manifest and workdir/captions from a media folder."""
    from pipelines import ingest as stage
    from pipelines.store import StageInputError
    try:
        report = stage.run(stage.IngestConfig(input=input, workdir=workdir, dataset=dataset,
                                              annotations=list(annotations), media_root=media_root))
    except StageInputError as err:
        _fail(EXIT_BAD_INPUT, str(err))
    typer.echo(json.dumps(report.__dict__, indent=2))


@app.command()
def describe(
    workdir: Path = typer.Option(..., help="Working folder; descriptions go to WORKDIR/descriptions."),
    input: Optional[Path] = typer.Option(None, "--input", help="Ingest this folder first (COCO-style or any media folder)."),
    dataset: Optional[str] = typer.Option(None, help="Dataset name used in item ids (default: input folder name)."),
    annotations: List[Path] = typer.Option([], help="COCO captions JSON (repeatable)."),
    media_root: Optional[Path] = typer.Option(None, help="Folder the COCO file_names are relative to."),
    engine: str = typer.Option("vllm", help="vllm | openai | transformers."),
    model: str = typer.Option(..., help="Model id or local folder (openai: the served model name)."),
    revision: Optional[str] = typer.Option(None, help="Model revision to pin (recorded in provenance)."),
    views: Optional[str] = typer.Option(None, help="Comma-separated view names to run (default: all)."),
    view: List[str] = typer.Option([], help="Extra view NAME=PROMPT ({media} -> image/video); repeatable."),
    views_file: Optional[Path] = typer.Option(None, help="TOML file with [views] name = prompt and optional [sampling]."),
    temperature: Optional[float] = typer.Option(None, help="Sampling temperature (default 0: greedy)."),
    top_p: Optional[float] = typer.Option(None),
    max_tokens: Optional[int] = typer.Option(None, help="Max new tokens per description (default 256)."),
    seed: Optional[int] = typer.Option(None),
    ignore_eos: bool = typer.Option(False, help="Always generate max_tokens (benchmarks)."),
    max_pixels: int = typer.Option(448 * 448, help="Bound on pixels per image / video frame."),
    video_frames: int = typer.Option(8, help="Uniform frames per video (when --video-fps is not set)."),
    video_fps: Optional[float] = typer.Option(None, help="Sample frames at this rate instead, capped by --max-video-frames."),
    max_video_frames: int = typer.Option(32),
    video_input: str = typer.Option("auto", help="auto | native (video input) | frames (several images)."),
    tensor_parallel_size: int = typer.Option(1, help="GPUs per vLLM engine."),
    max_model_len: Optional[int] = typer.Option(None),
    engine_arg: List[str] = typer.Option([], help="Extra vllm.LLM keyword KEY=VALUE (JSON values); repeatable."),
    trust_remote_code: bool = typer.Option(False, help="Allow model code from the model folder/hub."),
    base_url: str = typer.Option("http://127.0.0.1:8000/v1", help="openai engine: endpoint base URL."),
    api_key: Optional[str] = typer.Option(None, envvar="OPENAI_API_KEY", help="openai engine: API key."),
    concurrency: int = typer.Option(8, help="openai engine: requests in flight per actor."),
    timeout: float = typer.Option(120.0, help="openai engine: seconds per request."),
    max_retries: int = typer.Option(3, help="openai engine: retries on timeouts, 429 and 5xx."),
    device: str = typer.Option("auto", help="transformers engine: cpu | cuda | auto."),
    limit: Optional[int] = typer.Option(None, help="Only the first N items (in item-id order)."),
    dry_run: bool = typer.Option(False, help="Plan and count only; no engine starts."),
    overwrite: bool = typer.Option(False, help="Delete existing descriptions first."),
    max_error_rate: float = typer.Option(0.25, help="Exit 1 when more than this share of rows are errors."),
    ray_address: Optional[str] = typer.Option(None, envvar="RAY_ADDRESS", help="Ray cluster (default: a local Ray)."),
    num_engines: Optional[int] = typer.Option(None, help="Engine actors (default: one per GPU / TP group, else 1)."),
    batch_size: int = typer.Option(64, help="Requests per engine call."),
    rows_per_file: int = typer.Option(2048, help="Rows per output Parquet file (the unit of resume)."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
    report_json: Optional[Path] = typer.Option(None, help="Also write the end summary as JSON here."),
) -> None:
    """Describe every image/video with an MLLM: WORKDIR/descriptions, one row per (item, view)."""
    from pipelines import describe as stage
    from pipelines.engines.base import ENGINES, EngineConfig, SamplingConfig
    from pipelines.ingest import IngestConfig
    from pipelines.media import MediaConfig

    if engine not in ENGINES:
        _fail(EXIT_BAD_INPUT, f"unknown engine {engine!r}; choose one of {', '.join(ENGINES)}")
    if video_input not in ("auto", "native", "frames"):
        _fail(EXIT_BAD_INPUT, "--video-input must be auto, native or frames")
    if input is not None and not input.is_dir():
        _fail(EXIT_BAD_INPUT, f"--input {input} is not a folder")
    try:
        chosen, file_sampling = _select_views(views, list(view), views_file)
        flags = {"temperature": temperature, "top_p": top_p, "max_tokens": max_tokens, "seed": seed}
        sampling = SamplingConfig(**{**file_sampling, **{k: v for k, v in flags.items() if v is not None},
                                     "ignore_eos": ignore_eos or bool(file_sampling.get("ignore_eos", False))})
        media = MediaConfig(max_pixels=max_pixels, video_frames=video_frames, video_fps=video_fps,
                            max_video_frames=max_video_frames)
        engine_cfg = EngineConfig(engine=engine, model=model, revision=revision, sampling=sampling,
                                  video_input=video_input, max_video_frames=max_video_frames,
                                  trust_remote_code=trust_remote_code, tensor_parallel_size=tensor_parallel_size,
                                  max_model_len=max_model_len, engine_kwargs=_parse_engine_args(list(engine_arg)),
                                  base_url=base_url, api_key=api_key, concurrency=concurrency, timeout_s=timeout,
                                  max_retries=max_retries, device=device)
        ingest_cfg = (IngestConfig(input=input, workdir=workdir, dataset=dataset, annotations=list(annotations),
                                   media_root=media_root) if input is not None else None)
        cfg = stage.DescribeConfig(workdir=workdir, engine=engine_cfg, views=chosen, media=media, ingest=ingest_cfg,
                                   limit=limit, dry_run=dry_run, overwrite=overwrite, max_error_rate=max_error_rate,
                                   ray_address=ray_address, num_engines=num_engines, batch_size=batch_size,
                                   rows_per_file=rows_per_file, progress=progress)
    except (TypeError, ValueError) as err:
        _fail(EXIT_BAD_INPUT, f"bad option: {err}")
    _run_describe(cfg, report_json)


def _run_describe(cfg, report_json: Optional[Path]) -> None:
    """Run the stage, print the summary, and map failures to exit codes."""
    from pipelines import describe as stage
    from pipelines.engines.base import FatalEngineError
    from pipelines.store import StageInputError
    from pipelines.summary import print_describe_summary
    try:
        report = stage.run(cfg)
    except StageInputError as err:
        _fail(EXIT_BAD_INPUT, str(err))
    except FatalEngineError as err:
        _fail(EXIT_FATAL, f"fatal engine error: {err}")
    print_describe_summary(report)
    if report_json:
        report_json.parent.mkdir(parents=True, exist_ok=True)
        report_json.write_text(json.dumps(report.as_dict(), indent=2, default=str))
    rate = report.error_rows / report.rows_written if report.rows_written else 0.0
    if rate > cfg.max_error_rate:
        _fail(EXIT_FATAL, f"{report.error_rows} of {report.rows_written} rows are errors "
                          f"({rate:.1%} > --max-error-rate {cfg.max_error_rate:.1%})")


@app.command("make-sample-data")
def make_sample_data(
    out: Path = typer.Option(..., help="Folder to create (COCO-style: images/, videos/, annotations/)."),
    images: int = typer.Option(24), videos: int = typer.Option(4), seed: int = typer.Option(0),
) -> None:
    """Generate the project's small sample dataset: drawn images, encoded videos, English captions."""
    from pipelines.sample_data import make_sample_dataset
    path = make_sample_dataset(out, n_images=images, n_videos=videos, seed=seed)
    typer.echo(str(path))


@app.command("make-tiny-model")
def make_tiny_model(
    out: Path = typer.Option(..., help="Folder to create."),
    family: str = typer.Option("qwen2-vl", help="qwen2-vl | llava."),
    seed: int = typer.Option(0),
) -> None:
    """Build a tiny random-weight MLLM locally (offline demo and tests; its text is noise)."""
    from pipelines import tiny_models
    builders = {"qwen2-vl": tiny_models.build_tiny_qwen2_vl, "llava": tiny_models.build_tiny_llava}
    if family not in builders:
        _fail(EXIT_BAD_INPUT, f"unknown family {family!r}; choose one of {', '.join(builders)}")
    typer.echo(str(builders[family](out, seed=seed)))


@app.command()
def demo(
    workdir: Path = typer.Option(Path("runs/demo"), help="Where the sample data, tiny model and outputs go."),
    engine: str = typer.Option("vllm", help="vllm | transformers."),
) -> None:
    """Offline end-to-end run: sample dataset + tiny Qwen2-VL + describe on a local Ray."""
    from pipelines import describe as stage
    from pipelines import tiny_models
    from pipelines.engines.base import EngineConfig, SamplingConfig
    from pipelines.ingest import IngestConfig
    from pipelines.media import MediaConfig
    from pipelines.sample_data import make_sample_dataset
    data = make_sample_dataset(workdir / "sample-data")
    model = tiny_models.build_tiny_qwen2_vl(workdir / "tiny-qwen2-vl")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    typer.echo(f"sample data: {data}\ntiny model: {model} (random weights: its descriptions are noise)", err=True)
    engine_cfg = EngineConfig(engine=engine, model=str(model), sampling=SamplingConfig(max_tokens=32),
                              max_model_len=4096, device="cpu",
                              engine_kwargs={"enforce_eager": True} if engine == "vllm" else {})
    cfg = stage.DescribeConfig(workdir=workdir, engine=engine_cfg, media=MediaConfig(max_pixels=224 * 224),
                               ingest=IngestConfig(input=data, workdir=workdir, dataset="sample"),
                               progress=sys.stderr.isatty())
    _run_describe(cfg, workdir / "describe-report.json")


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
