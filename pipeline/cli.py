"""`imgtalk`: the command line.

    imgtalk dub --manifest URI --weights URI --output-report URI [--config job.yaml] [--address auto|ray://…] [--force] [--metrics-port N] [--verbose]
    imgtalk demo [--folder DIR] [--weights URI | --untrained] [--sync-speakers N] [--config job.yaml] [--no-eval] [--verbose]
    imgtalk validate MANIFEST [--config job.yaml] [--weights URI] [--report OUT.parquet] [--address auto] [--face-frames N] [--verbose]
    imgtalk weights init --size tiny|paper OUT
    imgtalk prepare --corpus URI --weights URI --output URI [--config prepare.yaml] [--address auto]
    imgtalk train extractor|hubert|vae|stage1|stage2 --shards URI --weights URI --output-bundle URI [--config train.yaml] [--address auto]
    imgtalk eval (--report URI | --prepared URI --weights [LABEL=]URI ...) --out URI [--protocol reconstruction|cross]
                 [--metric-weights DIR] [--config eval.yaml] [--address auto]
"""
from __future__ import annotations

import argparse
import os
import sys


class UserError(Exception):
    pass


def _print_summary(result) -> None:
    from pipeline.progress import format_summary

    for warning in getattr(result, "warnings", []):
        print(f"WARNING: {warning}")
    print()
    print(f"job {result.job_id}: {len(result.rows)} videos")
    print(format_summary(result.counts, result.seconds, result.frames))
    failed = [r for r in result.rows if r.status == "failed"]
    for r in failed:
        print(f"  FAILED row {r.row_index} [{r.error_stage}] {r.error}")
    print(f"report: {result.report_uri}")


def cmd_dub(args) -> int:
    from pipeline.config import load_job_config
    from pipeline.logs import job_log, log_path_for

    config = load_job_config(args.config)
    if args.max_failed_videos is not None:
        config = config.model_copy(update={"max_failed_videos": args.max_failed_videos})
    with job_log(log_path_for(args.output_report), args.verbose, until_exit=True) as logged:
        code = _dub(args, config)
    print(f"log: {logged.path}")
    return code


def _dub(args, config) -> int:
    from pipeline.dub.job import run_dub

    result = run_dub(args.manifest, args.weights, args.output_report, config, address=args.address,
                     metrics_export_port=args.metrics_port, force=args.force)
    _print_summary(result)
    if result.segments_reused:
        print(f"resumed: reused {result.segments_reused} encoded segments committed by an earlier run")
    for r in result.rows:
        if r.status == "ok":
            print(f"output: {r.output_uri}")
    if result.stopped:
        print(f"imgtalk: error: the job stopped early: {result.stopped}; every row is in the report ({result.report_uri})", file=sys.stderr)
        return 4
    return 0 if result.counts.get("failed", 0) == 0 else 3


DEMO_BUNDLE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "weights", "demo")


def cmd_demo(args) -> int:
    from pipeline.logs import job_log

    folder = os.path.abspath(args.folder)
    with job_log(os.path.join(folder, "report.log"), args.verbose, until_exit=True) as logged:
        code = _demo(args)
    print(f"log: {logged.path}")
    return code


def _demo(args) -> int:
    from pipeline.config import JobConfig, load_job_config
    from pipeline.dub.job import run_dub
    from pipeline.lipsync_eval import sync_manifest
    from pipeline.sample_catalogue import make_sample_catalogue
    from pipeline.synth_corpus import make_synth_corpus
    from pipeline.weights import init_bundle

    folder = os.path.abspath(args.folder)
    print(f"making the sample catalogue in {folder} …")
    # Lip-sync rows: speakers of the demo bundle's training corpus saying held-out sentences,
    # each video dubbed with another held-out sentence whose true mouth is known.
    sync_rows = []
    if args.sync_speakers > 0:
        heldout = os.path.join(folder, "heldout")
        if not os.path.exists(os.path.join(heldout, "corpus.parquet")):
            make_synth_corpus(heldout, speakers=args.sync_speakers, sentences_per_speaker=2, seed=0, heldout=True)
        sync_rows = sync_manifest(heldout, os.path.join(folder, "outputs"))
    paths = make_sample_catalogue(folder, extra_rows=sync_rows)
    weights = args.weights
    if weights is None and args.untrained:
        weights = os.path.join(folder, "weights-tiny")
        if not os.path.exists(os.path.join(weights, "bundle.json")):
            print("writing a tiny randomly initialised weights bundle (untrained: the mouth is re-rendered, not lip-synced) …")
            init_bundle(weights, size="tiny")
    elif weights is None:
        weights = DEMO_BUNDLE
        print(f"weights: the trained tiny demo bundle {weights} (scripts/train_demo_bundle.sh reproduces it)")
    config = load_job_config(args.config) if args.config else JobConfig(cache_uri=os.path.join(folder, "cache"))
    # One Ray for the dub and the eval after it: a second local start costs seconds, and on
    # a loaded machine it can miss Ray's fixed 30 s wait for the raylet (seen 2026-12-03).
    import ray

    from pipeline.dub.job import _init_ray

    started_ray = _init_ray(args.address)
    try:
        # A demo run always dubs, like `dub --force` (a real `dub` skips what is done).
        result = run_dub(paths["manifest"], weights, paths["report"], config, address=args.address, force=True)
        _print_summary(result)
        print(f"outputs: {paths['outputs']}")
        for r in result.rows:
            if r.status == "ok":
                print(f"  {r.output_uri}")
        _print_sync_figures(sync_rows, {r.output_uri: r.status for r in result.rows})
        if args.eval and result.counts.get("ok", 0):
            _demo_eval(paths["report"], weights, os.path.join(folder, "eval"), args.address)
    finally:
        if started_ray:
            ray.shutdown()
    return 0 if result.counts.get("failed", 0) == 0 else 3


def _demo_eval(report: str, weights: str, out: str, address: str | None) -> None:
    """imgtalk eval on the demo's own outputs (cross protocol: each is dubbed with another
    track, so no ground-truth frame): FID, AVConf and LSE-D, each skipped, with the reason,
    without its weights."""
    from pipeline.eval.config import EvalConfig
    from pipeline.eval.job import run_eval

    print("\nimgtalk eval on the demo's outputs (cross protocol):")
    result = run_eval(out, "cross", report_uri=report, bundles={"demo": weights}, config=EvalConfig(), address=address)
    print(result.table)
    print(f"per-video metrics: {out}/eval.parquet")


def _print_sync_figures(sync_rows: list[dict], status: dict) -> None:
    """The demo's own lip-sync figures (pipeline/lipsync_eval.py): FaceMesh on each output
    against the true mouth of the sentence it was dubbed with."""
    from pipeline.lipsync_eval import dub_figures
    from stages.face.tracker import FaceTracker

    done = [r for r in sync_rows if status.get(r["output_uri"]) == "ok"]
    if not done:
        return
    print("\nlip sync on held-out sentences (face mesh on the output vs the dubbed sentence's true mouth):")
    print(f"  {'output':<44} {'r':>6} {'silent/neutral':>15} {'truth s/n':>10} {'s/n source':>11} {'of speech gap':>14} "
          f"{'cavity':>8} {'jitter':>8} {'truth jitter':>13}")
    with FaceTracker(smoothing_sigma_frames=0, max_gap_frames=0) as tracker:
        for r in done:
            f = dub_figures(r["output_uri"], r["truth"], r["truth_video"], tracker=tracker,
                            source_video=r["video_uri"], source_truth_json=r["source_truth"])
            print(f"  {os.path.basename(r['output_uri']):<44} {f['pearson_r']:>6.3f} "
                  f"{1 + f['silent_relative_to_neutral']:>15.3f} {1 + f['truth_video_silent_relative_to_neutral']:>10.3f} "
                  f"{f['silent_over_source_neutral']:>11.3f} "
                  f"{f['silent_share_of_speech_gap']:>14.3f} "
                  f"{str(f['silent_frames_with_cavity']) + '/' + str(f['silent_frames_measured']):>8} "
                  f"{f['jitter']:>8.4f} {f['truth_video_jitter']:>13.4f}")
    print("  r: Pearson r of the measured inner-lip opening with the true jaw opening, per frame;")
    print("  silent/neutral: the mouth's opening in silent frames over the speaker's closed-mouth opening (1 = closed);")
    print("  truth s/n: the same of the true video itself, the measure's floor (a closed mouth's reading scatters);")
    print("  s/n source: silent/neutral over the dubbed source video's own closed-mouth opening instead;")
    print("  of speech gap: silence's opening above closed, over speech's (0 = closed, 1 = as open as in speech);")
    print("  cavity: silent frames whose lips show a dark mouth cavity between them (the pixels), of those measured.")


def cmd_validate(args) -> int:
    from pipeline.config import load_job_config
    from pipeline.logs import job_log, log_path_for
    from pipeline.storage import is_remote

    config = load_job_config(args.config)
    if args.face_frames < 0:
        raise UserError("--face-frames must be 0 or more")
    if args.report:
        path = log_path_for(args.report)
    else:  # no report to sit beside: the cache folder when it is local
        base = config.cache_uri if not is_remote(config.cache_uri) else "."
        path = os.path.join(os.path.abspath(base), "logs", "validate.log")
    with job_log(path, args.verbose, until_exit=True) as logged:
        code = _validate(args, config)
    print(f"log: {logged.path}")
    return code


def _validate(args, config) -> int:
    from pipeline.validate.estimate import format_estimate
    from pipeline.validate.job import run_validate

    if args.weights:
        # The bundle a dub would load: a broken one is a job-level mistake (exit 2), found now.
        from pipeline.dub.job import _check_stage2_condition
        from pipeline.storage import Storage
        from pipeline.weights import load_syncnet, localize_bundle, read_bundle_info

        bundle = read_bundle_info(localize_bundle(args.weights, Storage(config.storage.options())))
        _check_stage2_condition(bundle)
        load_syncnet(bundle)
        print(f"weights: {args.weights} ({'trained' if bundle.trained else 'UNTRAINED: a dub would re-render, not lip-sync'})")
    result = run_validate(args.manifest, config, report_uri=args.report, address=args.address, face_frames=args.face_frames)
    problems = result.problems
    print(f"validated {len(result.rows)} rows: {len(result.rows) - len(problems)} ok, {len(problems)} with problems")
    for r in problems:
        for p in r.problems:
            print(f"  row {r.row_index} {p}")
    print(format_estimate(result.estimate, config))
    if args.report:
        print(f"report: {args.report}")
    return 3 if problems else 0


def cmd_prepare(args) -> int:
    from pipeline.prepare.config import load_prepare_config
    from pipeline.prepare.job import run_prepare

    result = run_prepare(args.corpus, args.weights, args.output, load_prepare_config(args.config), address=args.address)
    card = result.card
    print(f"prepared {result.counts.get('ok', 0)} videos ({result.frames} frames at 25 fps, {result.frames_per_second:.1f} frames/s), "
          f"skipped {result.counts.get('skipped', 0)} already prepared, {result.counts.get('failed', 0)} failed")
    for r in result.rows:
        if r.status == "failed":
            print(f"  FAILED row {r.row_index} [{r.error_stage}] {r.error}")
    if card.get("videos"):
        splits = ", ".join(f"{k} {v['videos']} videos / {len(v['speakers'])} speakers" for k, v in card["splits"].items())
        print(f"corpus {card['id']}: {card['videos']} videos, {card['speakers']} speakers, {card['hours']:.3f} h; {splits}")
    print(f"shards: {result.output_uri}")
    return 0 if result.counts.get("failed", 0) == 0 else 3


def cmd_train(args) -> int:
    from pipeline.train.config import load_train_config
    from pipeline.train.job import run_train

    result = run_train(args.stage, args.shards, args.weights, args.output_bundle, load_train_config(args.config), address=args.address)
    shown = ", ".join(f"{k} {v:.4g}" for k, v in sorted(result.metrics.items()) if isinstance(v, float))
    print(f"{args.stage}: {result.steps} steps in {result.seconds:.1f} s; last report: {shown}")
    print(f"curves: {result.run_dir}")
    print(f"bundle: {result.bundle_uri}")
    return 0


def _labelled(specs: list[str] | None) -> dict[str, str]:
    """[LABEL=]URI arguments -> {label: uri}; the label defaults to the folder's name."""
    out = {}
    for spec in specs or []:
        label, sep, uri = spec.partition("=")
        if not sep or "://" in label:
            label, uri = os.path.basename(spec.rstrip("/")) or spec, spec
        if label in out:
            raise UserError(f"--weights: label {label!r} given twice; name them LABEL=URI")
        out[label] = uri
    return out


def cmd_eval(args) -> int:
    from pipeline.eval.config import load_eval_config
    from pipeline.eval.job import EvalError, run_eval

    config = load_eval_config(args.config)
    if args.metric_weights:
        config = config.model_copy(update={"metric_weights_uri": args.metric_weights})
    try:
        result = run_eval(args.out, args.protocol, report_uri=args.report, prepared_uri=args.prepared,
                          bundles=_labelled(args.weights), config=config, address=args.address)
    except EvalError as e:
        raise UserError(str(e)) from e
    failed = [r for r in result.rows if r.status == "failed"]
    print(f"\n{result.protocol} protocol: {len(result.rows) - len(failed)} videos scored, {len(failed)} failed "
          f"({result.seconds:.0f} s)")
    for r in failed:
        print(f"  FAILED {r.output_uri}: {r.error}")
    print()
    print(result.table)
    for label, entry in result.summary.items():
        if entry.get("fid_note"):
            print(f"note ({label}): FID from {entry['fid_note']}")
    print(f"per-video metrics: {args.out.rstrip('/')}/eval.parquet; settings and means: summary.json; table: table.md")
    return 0 if not failed else 3


def cmd_weights_init(args) -> int:
    from pipeline.weights import init_bundle

    init_bundle(args.out, size=args.size, seed=args.seed)
    print(f"wrote a randomly initialised {args.size} bundle (marked untrained) to {args.out}")
    return 0


def cmd_synth_corpus(args) -> int:
    from pipeline.synth_corpus import make_synth_corpus
    from stages.synth.speaker import SynthError

    if args.speakers < 1 or args.sentences < 1:
        raise UserError("--speakers and --sentences must be 1 or more")
    try:
        out = make_synth_corpus(args.folder, speakers=args.speakers, sentences_per_speaker=args.sentences,
                                seed=args.seed, face_image=args.face, heldout=args.heldout)
    except (ValueError, SynthError) as e:
        raise UserError(str(e)) from e
    for c in out["clips"]:
        print(f"{c['clip']}: {c['frames']} frames, speaker {c['speaker_id']}, speech from {c['speech_source']}")
        print(f"  video {c['video']}\n  audio {c['audio']}\n  truth {c['truth']}")
    frames = sum(c["frames"] for c in out["clips"])
    print(f"wrote {len(out['clips'])} clips ({frames} frames at 25 fps) for {args.speakers} speakers in {out['seconds']:.1f} s")
    print(f"speakers: {out['speakers']}")
    print(f"corpus: {out['corpus']}  (imgtalk prepare --corpus {out['corpus']} --weights … --output …)")
    return 0


_VERBOSE_HELP = ("show Ray's, mediapipe's and the workers' own log lines in the terminal too "
                 "(they always go to the job's log file)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="imgtalk", description="Catalogue-scale lip-sync dubbing with IMGTalk on Ray")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("dub", help="dub every row of a manifest")
    d.add_argument("--manifest", required=True, help="Parquet manifest URI (video_uri, audio_uri, output_uri[, options])")
    d.add_argument("--weights", required=True, help="weights bundle folder or URI")
    d.add_argument("--output-report", required=True, help="where to write the Parquet report")
    d.add_argument("--config", help="job config YAML")
    d.add_argument("--address", help="Ray address (auto, ray://host:10001); default: a local Ray for this job")
    d.add_argument(
        "--max-failed-videos",
        type=int,
        metavar="N",
        help="error budget: stop cleanly (report written, exit 4) once more than N videos have failed; overrides the config",
    )
    d.add_argument(
        "--force",
        action="store_true",
        help="redo every video, even one whose output exists and whose inputs are unchanged since it was made",
    )
    d.add_argument(
        "--metrics-port",
        type=int,
        help="local Ray only: export Prometheus metrics on this port (and write Ray's service-discovery file); "
        "a cluster sets it at `ray start --metrics-export-port`",
    )
    d.add_argument("--verbose", action="store_true", help=_VERBOSE_HELP)
    d.set_defaults(func=cmd_dub)

    m = sub.add_parser("demo", help="make a sample catalogue and dub it end to end on a local Ray")
    m.add_argument("--folder", default="demo_out", help="where the sample catalogue and outputs go")
    m.add_argument("--weights", help="weights bundle (default: the trained tiny demo bundle in weights/demo)")
    m.add_argument("--untrained", action="store_true", help="dub with a tiny randomly initialised bundle instead")
    m.add_argument("--sync-speakers", type=int, default=2, help="speakers of the held-out lip-sync rows (0: none)")
    m.add_argument("--config", help="job config YAML")
    m.add_argument("--address", help="Ray address; default: a local Ray")
    m.add_argument("--no-eval", dest="eval", action="store_false", help="skip imgtalk eval on the outputs at the end")
    m.add_argument("--verbose", action="store_true", help=_VERBOSE_HELP)
    m.set_defaults(func=cmd_demo)

    v = sub.add_parser("validate", help="dry run: probe every manifest row, report problems and estimate the job's cost")
    v.add_argument("manifest", metavar="MANIFEST", help="Parquet manifest URI, as for dub")
    v.add_argument("--config", help="job config YAML (security prefixes, qc.max_audio_fit_s, pools and the `cost` table)")
    v.add_argument("--weights", help="also check that this weights bundle loads")
    v.add_argument("--report", metavar="OUT.parquet", help="write the findings as Parquet, one row per manifest row")
    v.add_argument("--address", help="Ray address; default: a local Ray")
    v.add_argument("--face-frames", type=int, default=3, metavar="N",
                   help="frames per video sampled for a face (0: skip the face check)")
    v.add_argument("--verbose", action="store_true", help=_VERBOSE_HELP)
    v.set_defaults(func=cmd_validate)

    pr = sub.add_parser("prepare", help="turn a talking-head corpus into training shards")
    pr.add_argument("--corpus", required=True, help="Parquet manifest (video_uri[, audio_uri, speaker_id, split]) or a folder/prefix of videos")
    pr.add_argument("--weights", required=True, help="weights bundle (HuBERT and the motion extractor are used)")
    pr.add_argument("--output", required=True, help="where the shards, videos.parquet, card.json and report.parquet go")
    pr.add_argument("--config", help="prepare config YAML (pipeline/prepare/config.py)")
    pr.add_argument("--address", help="Ray address; default: a local Ray")
    pr.set_defaults(func=cmd_prepare)

    tr = sub.add_parser("train", help="train Stage 1, Stage 2 (or a stand-in) on Ray Train from prepared shards")
    tr.add_argument("stage", choices=["extractor", "hubert", "vae", "stage1", "stage2"],
                    help="extractor / hubert / vae: small stand-ins for LivePortrait's motion extractor, HuBERT and "
                         "the SD VAE, trained on the corpus (only without the real ones)")
    tr.add_argument("--shards", required=True, help="the output of imgtalk prepare")
    tr.add_argument("--weights", required=True, help="base bundle: HuBERT, VAE, motion extractor, the other stage")
    tr.add_argument("--output-bundle", required=True, help="where the bundle with the trained stage goes")
    tr.add_argument("--config", help="training config YAML (pipeline/train/config.py); same name + storage_path resumes")
    tr.add_argument("--address", help="Ray address; default: a local Ray")
    tr.set_defaults(func=cmd_train)

    ev = sub.add_parser("eval", help="SSIM, PSNR, FID, LMD, AVConf/LSE-C, LSE-D over a test set (Table 1; Table 2 for several bundles)")
    src = ev.add_mutually_exclusive_group(required=True)
    src.add_argument("--report", help="a dub report: evaluate its ok outputs against their sources")
    src.add_argument("--prepared", help="the output of imgtalk prepare: dub its test split with each --weights bundle, then evaluate")
    ev.add_argument("--weights", action="append", metavar="[LABEL=]URI",
                    help="weights bundle (repeat for an ablation table; LABEL names its row)")
    ev.add_argument("--protocol", choices=["reconstruction", "cross"], default=None,
                    help="reconstruction: own audio, compared with the source (default with --prepared); "
                         "cross: another audio, FID/AVConf/LSE-D only (default with --report)")
    ev.add_argument("--out", required=True, help="folder for eval.parquet, summary.json, table.md (and the dubs)")
    ev.add_argument("--metric-weights", help="folder with the FID Inception and SyncNet files (see README: Measuring quality)")
    ev.add_argument("--config", help="eval config YAML (pipeline/eval/config.py)")
    ev.add_argument("--address", help="Ray address; default: a local Ray")
    ev.set_defaults(func=cmd_eval)

    w = sub.add_parser("weights", help="weights bundle tools")
    wsub = w.add_subparsers(dest="weights_command", required=True)
    wi = wsub.add_parser("init", help="write a randomly initialised bundle (no download)")
    wi.add_argument("--size", choices=["tiny", "paper"], default="tiny")
    wi.add_argument("--seed", type=int, default=0)
    wi.add_argument("out", help="output folder or URI")
    wi.set_defaults(func=cmd_weights_init)

    sc = sub.add_parser("synth-corpus", help="render a synthetic talking-head corpus whose mouth follows its speech by known formulas")
    sc.add_argument("--folder", required=True, help="where the videos, wavs, truth JSONs and corpus.parquet go")
    sc.add_argument("--speakers", type=int, default=4, help="synthetic speakers (look and voice differ)")
    sc.add_argument("--sentences", type=int, default=3, help="sentences per speaker")
    sc.add_argument("--seed", type=int, default=0)
    sc.add_argument("--face", help="RGB face image (default: skimage's astronaut)")
    sc.add_argument("--heldout", action="store_true",
                    help="speak the held-out sentences (never in a training corpus) with the same speakers, for checks")
    sc.set_defaults(func=cmd_synth_corpus)
    return p


def main(argv: list[str] | None = None) -> int:
    from pipeline.config import ConfigError
    from pipeline.dub.schemas import ManifestError
    from pipeline.security import PolicyError
    from pipeline.train.job import TrainError
    from pipeline.weights import BundleError

    args = build_parser().parse_args(argv)
    if getattr(args, "command", None) == "eval" and args.protocol is None:
        args.protocol = "reconstruction" if args.prepared else "cross"
    if getattr(args, "max_failed_videos", None) is not None and args.max_failed_videos < 0:
        print("imgtalk: error: --max-failed-videos must be 0 or more", file=sys.stderr)
        return 2
    try:
        return args.func(args)
    except (ConfigError, ManifestError, BundleError, PolicyError, UserError, TrainError) as e:
        print(f"imgtalk: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("imgtalk: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
