"""The ``malaria-cells`` command line: a thin layer over the Python API."""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from pathlib import Path

from .errors import MalariaCellsError

EXIT_OK, EXIT_SKIPPED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130

EPILOG = """\
examples:
  malaria-cells download                                   # fetch the NIH images (337 MiB)
  malaria-cells train --data cell_images --out runs/first  # train, evaluate, plot
  malaria-cells train --preset tutorial --split patient --out runs/tutorial
  malaria-cells evaluate --model runs/first/model.keras --data other_patients/
  malaria-cells predict cell.png slides/ --format csv --output results.csv
  malaria-cells screen patient1/ patient2/ --out report/  # whole smear photographs
  malaria-cells screen slide/ --out report/ --db lab.db   # ... and record each sample
  malaria-cells history --db lab.db --since 2026-11-01    # the samples recorded
  malaria-cells info

Exit status: 0 success; 1 some input files could not be read (predict, listed on
stderr); 2 a usage or input error; 130 interrupted.
"""


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {text}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {text}")
    return value


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number of seconds above 0, got {text}")
    return value


def add_model_option(parser) -> None:
    parser.add_argument("--model", metavar="PATH",
                        help="model: .keras, .tflite or .onnx file, or a run folder (default: the shipped model)")


def add_db_option(parser, help_text: str) -> None:
    parser.add_argument("--db", metavar="URL", help=help_text)


def add_scoring_options(parser) -> None:
    parser.add_argument("--threshold", type=_fraction, help="override the model's stored threshold")
    parser.add_argument("--batch-size", type=_positive_int, default=256, help="images scored at once (default: 256)")
    parser.add_argument("--tta", action="store_true",
                        help="average over the 8 rotations/mirrors of each cell (8x slower)")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    from .config import AUGMENTATIONS, COLORS, EXPORT_FORMATS, MODEL_NAMES, PRESET_NAMES, QUANTIZATIONS, SCHEDULES, SPLITS
    from .distribute import STRATEGIES

    parser = argparse.ArgumentParser(
        prog="malaria-cells",
        description="Tell Parasitized from Uninfected red blood cells in Giemsa-stained "
        "thin blood smear images.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name, help_text, description=None):
        return commands.add_parser(name, help=help_text, description=description or help_text,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)

    train = command("train", "train a model and write a run folder",
                    "Train on a labelled folder (Parasitized/ and Uninfected/ inside). Writes\n"
                    "RUN_DIR/model.keras (best epoch by validation loss, with its threshold),\n"
                    "config.json, history.csv, metrics.json (held-out test patients) and plots.\n"
                    "Options not given come from --preset, then from the defaults shown.")
    train.add_argument("--data", metavar="DIR", help="dataset folder (default: ./cell_images, else the download cache)")
    train.add_argument("--out", metavar="RUN_DIR", required=True, help="run folder to create (must be new or empty)")
    train.add_argument("--preset", choices=PRESET_NAMES, help="start from a named recipe; flags override it. "
                       "'tutorial' = 70x70 gray, 3 conv blocks, 3 epochs, random split")
    train.add_argument("--model", choices=MODEL_NAMES, help="architecture (default: cellnet-slim; cellnet-lite is faster on AVX-512 CPUs and a little less accurate; cellnet is wider and slower)")
    train.add_argument("--weights", metavar="imagenet|none|PATH",
                       help="starting weights for Keras Applications models (default: none)")
    train.add_argument("--epochs", type=_positive_int, help="passes over the training cells (default: 60)")
    train.add_argument("--batch-size", type=_positive_int, help="cells per step (default: 64)")
    train.add_argument("--image-size", type=_positive_int, help="resize cells to N x N pixels (default: 64)")
    train.add_argument("--color", choices=COLORS, help="what the network sees (default: rgb)")
    train.add_argument("--split", choices=SPLITS,
                       help="patient: each patient in one part only (default, honest); "
                       "random: per image, as the tutorial (leaks patients)")
    train.add_argument("--val-fraction", type=_fraction, help="share of non-test patients for validation (default: 0.2)")
    train.add_argument("--test-fraction", type=_fraction, help="share of patients held out for test (default: 0.2)")
    train.add_argument("--folds", type=int, metavar="K",
                       help="cross-validation: split patients into K folds and test on one (default: off, "
                       "use --test-fraction)")
    train.add_argument("--fold", type=int, metavar="I",
                       help="with --folds K, the fold (0 to K-1) to test on; run all K with the same --seed")
    train.add_argument("--seed", type=int, help="seeds split, weights and augmentation (default: 0)")
    train.add_argument("--learning-rate", type=float, help="peak learning rate (default: 0.003)")
    train.add_argument("--schedule", choices=SCHEDULES, help="learning-rate schedule (default: cosine)")
    train.add_argument("--augment", choices=AUGMENTATIONS, help="training augmentation (default: flips+color)")
    train.add_argument("--stain-normalization", action=argparse.BooleanOptionalAction, default=None,
                       help="divide each cell by its own mean colour inside the model (default: on)")
    train.add_argument("--ema", action=argparse.BooleanOptionalAction, default=None,
                       help="keep a moving average of the weights and use it (default: on)")
    train.add_argument("--weight-decay", type=float, metavar="RATE",
                       help="AdamW decoupled weight decay; 0 for plain Adam (default: 0.0001)")
    train.add_argument("--label-smoothing", type=_fraction, help="target smoothing (default: 0.05)")
    train.add_argument("--mixup", type=float, metavar="ALPHA",
                       help="blend training cells and labels, weights ~ Beta(ALPHA, ALPHA) (default: 0, off)")
    train.add_argument("--target-sensitivity", type=_fraction,
                       help="choose the threshold on validation patients for this sensitivity (default: 0.99)")
    train.add_argument("--min-specificity", type=_fraction,
                       help="...but never below this validation specificity (default: 0.93)")
    train.add_argument("--strategy", choices=STRATEGIES, default="default",
                       help="default: one process; mirrored: all local GPUs (or the CPU); multi-worker: the "
                            "cluster in the TF_CONFIG environment variable, one process per worker, only the chief "
                            "writes RUN_DIR. --batch-size is then global (split between replicas); see "
                            "docs/distributed-training.md")
    train.add_argument("--overwrite", action="store_true", help="allow writing into a non-empty RUN_DIR")
    train.add_argument("--quiet", action="store_true", help="no progress bar")

    retune = command("retune", "choose a trained run's threshold again, for another operating point",
                     "No retraining: the threshold is chosen on the run's own validation patients\n"
                     "(listed in RUN_DIR/config.json) exactly as train does, stored in model.keras,\n"
                     "and the test patients are scored again (metrics.json). For example, a lab that\n"
                     "can afford more false alarms: --target-sensitivity 0.995 --min-specificity 0.9")
    retune.add_argument("run", metavar="RUN_DIR", help="a folder written by train")
    retune.add_argument("--target-sensitivity", type=_fraction, help="new target (default: the run's own)")
    retune.add_argument("--min-specificity", type=_fraction, help="new specificity floor (default: the run's own)")
    retune.add_argument("--data", metavar="DIR", help="where the run's images are now (default: where they were)")

    evaluate = command("evaluate", "score a model on a labelled folder",
                       "Sensitivity, specificity, accuracy, precision, F1, MCC and ROC AUC with 95%\n"
                       "confidence intervals, the confusion matrix and, when file names carry NIH\n"
                       "patient ids (C<digits>...), per-patient figures.")
    add_model_option(evaluate)
    evaluate.add_argument("--data", metavar="DIR", required=True, help="labelled folder: Parasitized/ and Uninfected/ inside")
    evaluate.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    evaluate.add_argument("--plots", metavar="DIR", help="also draw ROC, PR, confusion, histogram and calibration PNGs")
    add_scoring_options(evaluate)

    predict = command("predict", "label image files and folders",
                      "One row per image: path, probability of Parasitized, label. Folders are\n"
                      "searched recursively. Unreadable files are listed on stderr and skipped;\n"
                      "the exit status is then 1.")
    predict.add_argument("paths", nargs="+", metavar="PATH", help="image files and folders")
    add_model_option(predict)
    predict.add_argument("--format", choices=("table", "csv", "json"), default="table", help="output format (default: table)")
    predict.add_argument("--output", metavar="FILE", help="write results to FILE instead of stdout")
    predict.add_argument("--overwrite", action="store_true", help="replace FILE if it exists")
    predict.add_argument("--any-image", action="store_true",
                         help="label every image, even one that does not look like a single red-cell crop "
                              "(by default such images are skipped with the reason)")
    add_scoring_options(predict)

    screen = command("screen", "screen smear photographs: count cells, parasitemia, a call",
                     "Finds every red cell of each field photograph, classifies it, and reports\n"
                     "parasitemia (infected / counted cells) with a 95% interval and, per sample, a\n"
                     "call: positive, negative or review. A folder is one sample (a slide or a\n"
                     "patient) and its images are its fields; files given directly form one more.\n"
                     "Coordinates are pixels of the images as stored (EXIF orientation not applied).\n\n"
                     "examples:\n"
                     "  malaria-cells screen src/malaria_cells/examples/fields\n"
                     "  malaria-cells screen patient1/ patient2/ --out report/\n"
                     "  malaria-cells screen slide/ --out report/ --patient P-0193 --operator 'A. Diallo'\n"
                     "  malaria-cells screen batch/*/ --out reports/ --manifest samples.csv\n"
                     "  malaria-cells screen slide/ --format json --output screen.json\n"
                     "  malaria-cells screen fields/ --truth annotations.json\n"
                     "  malaria-cells screen slide/ --out report/ --patient P-0193 --db sqlite:///lab.db\n"
                     "  MALARIA_CELLS_DB=postgresql+psycopg://lab@dbhost/malaria malaria-cells screen slide/\n"
                     "  (the PostgreSQL password in ~/.pgpass or $PGPASSWORD: a URL's is seen by `ps`)")
    screen.add_argument("paths", nargs="+", metavar="PATH", help="field images or folders (one sample each)")
    add_model_option(screen)
    screen.add_argument("--out", metavar="DIR",
                        help="also write a report per sample here (report.html and report.pdf for one sample; "
                        "SAMPLE.html, SAMPLE.pdf and index.html for several), overlays, cells.csv and report.json")
    screen.add_argument("--no-pdf", action="store_true", help="with --out, write the HTML reports only")
    screen.add_argument("--pooled", action="store_true",
                        help="also show the figures of all samples pooled (off: pooling patients describes none)")
    screen.add_argument("--manifest", metavar="CSV",
                        help="identifiers per sample: a CSV with a 'sample' column (the folder names) and any of "
                        "patient, slide, operator, date, site, note")
    for name, text in (("patient", "patient identifier"), ("slide", "slide identifier"),
                       ("operator", "who prepared or read the slide"), ("date", "date the blood was taken, YYYY-MM-DD"),
                       ("site", "laboratory or clinic"), ("note", "free text")):
        screen.add_argument(f"--{name}", default="", metavar="TEXT",
                            help=f"{text}, for every sample (a --manifest row takes its place)")
    from .fields.formats import FORMATS

    screen.add_argument("--format", choices=tuple(FORMATS), default="table",
                        help="; ".join(f"{name}: {item.description}" for name, item in FORMATS.items())
                        + " (default: table)")
    screen.add_argument("--output", metavar="FILE", help="write the results to FILE instead of stdout")
    screen.add_argument("--overwrite", action="store_true", help="replace FILE, or write into a non-empty DIR")
    screen.add_argument("--truth", metavar="PATH", nargs="?", const=True,
                        help="score against ground truth: NIH point files beside the images (no value), "
                        "or an annotations JSON file or folder")
    screen.add_argument("--threshold", type=_fraction,
                        help="counting threshold (default: the one the model carries for fields)")
    screen.add_argument("--rbc-per-ul", type=float, default=5_000_000, metavar="N",
                        help="the patient's red cells per microlitre, for parasites per microlitre "
                        "(default: 5,000,000, the WHO thin-film convention)")
    screen.add_argument("--max-field-seconds", type=_positive_seconds, default=120.0, metavar="S",
                        help="a field still not screened after S seconds is reported as not screened and the "
                        "rest go on (default: 120; a 40 MP photograph takes a few seconds)")
    screen.add_argument("--workers", type=_positive_int, metavar="N",
                        help="screen the samples in parallel on a local Dask cluster of N worker processes "
                        "(one sample per task; each sample recorded in --db as it finishes)")
    screen.add_argument("--scheduler", metavar="ADDRESS",
                        help="screen the samples on a running Dask cluster (tcp://host:8786); its workers must "
                        "be able to read the paths")
    add_db_option(screen, "also record each sample, its fields and counted cells in this database (made if "
                  "new): a SQLite file (lab.db or sqlite:///lab.db) or postgresql+psycopg://USER:PASSWORD@HOST/DB "
                  "(default: $MALARIA_CELLS_DB; unset, nothing is recorded)")

    history = command("history", "list the screened samples recorded in a database",
                      "The samples that screen --db and serve --db recorded, newest first: when (UTC),\n"
                      "sample, patient, call, parasitemia, parasites per microlitre, cells counted and\n"
                      "the model. csv (one row per sample) and json (every figure of each sample, with\n"
                      "its metadata and model) are for export.\n\n"
                      "examples:\n"
                      "  malaria-cells history                                # $MALARIA_CELLS_DB, else ./lab.db\n"
                      "  malaria-cells history --db lab.db --since 2026-11-01 --call positive\n"
                      "  malaria-cells history --format csv --output november.csv\n"
                      "  malaria-cells history --db postgresql+psycopg://lab@dbhost/malaria --format json --limit 50")
    add_db_option(history, "the records database: a SQLite file (lab.db or sqlite:///lab.db) or "
                  "postgresql+psycopg://USER:PASSWORD@HOST/DB (default: $MALARIA_CELLS_DB, else sqlite:///lab.db)")
    history.add_argument("--since", metavar="YYYY-MM-DD", help="only samples screened on or after this day (UTC)")
    history.add_argument("--call", metavar="positive|negative|review", help="only samples with this call")
    history.add_argument("--limit", type=_positive_int, metavar="N", help="only the newest N samples")
    history.add_argument("--format", choices=("table", "csv", "json"), default="table",
                         help="table: for a terminal; csv: one row per sample; json: one object, "
                         "{\"samples\": [...]} (default: table)")
    history.add_argument("--output", metavar="FILE", help="write to FILE instead of stdout")
    history.add_argument("--overwrite", action="store_true", help="replace FILE if it exists")

    download = command("download", "fetch the public NIH cell images",
                       "Download (resumable), verify (size, zip CRCs, optional SHA-256) and safely\n"
                       "extract the NIH malaria cell images into DEST/cell_images.")
    download.add_argument("--dest", metavar="DIR", help="target folder (default: $MALARIA_CELLS_HOME or ~/.cache/malaria-cells)")
    download.add_argument("--url", help="archive address (default: the NIH URL)")
    download.add_argument("--sha256", help="refuse the archive unless it has this SHA-256")
    download.add_argument("--quiet", action="store_true", help="no progress bar")

    serve = command("serve", "run the web page and REST API",
                    "A web page to drop cell images on (GET /), a REST API (POST /v1/predict with\n"
                    "multipart 'files', POST /v1/screen, GET /v1/model, GET /healthz, GET /readyz) and its\n"
                    "docs at /docs. Screening runs at most --screening-slots requests at once; health\n"
                    "and readiness are answered outside them, at once, whatever the load.\n"
                    "Binds to 127.0.0.1: only this computer can reach it. To serve a lab network,\n"
                    "pass --host 0.0.0.0 AND set an API key (--api-key or $MALARIA_CELLS_API_KEY);\n"
                    "without one it refuses to start unless you pass --no-auth.")
    add_model_option(serve)
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    serve.add_argument("--api-key", help="require this key (header X-API-Key) on every endpoint but /healthz")
    serve.add_argument("--no-auth", action="store_true",
                       help="serve on a non-loopback --host without an API key (a warning is printed)")
    serve.add_argument("--max-images", type=_positive_int, default=256, help="images per request (default: 256)")
    serve.add_argument("--max-upload-mb", type=_positive_int, default=64, help="request size limit in MiB (default: 64)")
    serve.add_argument("--max-seconds", type=_positive_seconds, default=120.0, metavar="S",
                       help="time limit of one /v1/screen request: fields not screened by then are reported as "
                       "such and the rest of the answer is given (default: 120)")
    serve.add_argument("--max-field-seconds", type=_positive_seconds, default=30.0, metavar="S",
                       help="time limit of one field; past it, that field is reported as not screened (default: 30)")
    serve.add_argument("--screening-slots", type=_positive_int, default=2, metavar="N",
                       help="screening requests run at once per process, the rest wait (default: 2; each "
                       "field may take a few hundred MB)")
    serve.add_argument("--workers", type=_positive_int, default=1,
                       help="server processes sharing the port, each with its own copy of the model "
                       "(default: 1; on a machine that only serves, try its number of cores)")
    add_db_option(serve, "record each /v1/screen sample in this database (its answer carries the record_id): "
                  "a SQLite file or postgresql+psycopg://USER:PASSWORD@HOST/DB (default: $MALARIA_CELLS_DB; "
                  "unset, nothing is recorded)")
    serve.add_argument("--user-keys", metavar="FILE",
                       help="per-user keys for reviewing recorded samples: a CSV file of name,key lines (each key "
                       "works as an API key, and a review sent with it is signed with its name; needs --db)")

    export = command("export", "export a model for phones and servers (TFLite, ONNX, SavedModel)",
                     "Writes the model with its preprocessing inside, and FILE.json beside it with the\n"
                     "input size, threshold and recipe. predict, evaluate and serve accept .tflite and\n"
                     ".onnx files. --check DIR compares the export with the Keras model on labelled\n"
                     "images (same label on >= 99.5%, accuracy within 0.3 points, or exit status 1).")
    export.add_argument("--model", metavar="PATH", help=".keras model or run folder (default: the shipped model)")
    export.add_argument("--format", required=True, choices=EXPORT_FORMATS)
    export.add_argument("--quantize", choices=QUANTIZATIONS, default="none",
                        help="none (default), float16 (tflite) or int8 (calibrated on --calibration images)")
    export.add_argument("--out", required=True, metavar="FILE", help="file to write (a folder for saved_model)")
    export.add_argument("--calibration", metavar="DIR",
                        help="images for int8 calibration (default: the model's training data, when present)")
    export.add_argument("--check", metavar="DIR", help="labelled folder to check the export against the Keras model")
    export.add_argument("--overwrite", action="store_true", help="replace FILE if it exists")

    info = command("info", "show which model is in use and its metadata")
    add_model_option(info)
    info.add_argument("--json", action="store_true", help="print one JSON object")
    return parser


def run_train(args) -> int:
    from .training import make_config, train

    options = {k: getattr(args, k) for k in (
        "data", "model", "weights", "epochs", "batch_size", "image_size", "color", "split",
        "val_fraction", "test_fraction", "folds", "fold", "seed", "learning_rate", "schedule", "augment",
        "weight_decay", "label_smoothing", "mixup", "target_sensitivity", "min_specificity", "stain_normalization", "ema")}
    config = make_config(args.preset, **options)
    result = train(config, args.out, overwrite=args.overwrite, verbose=0 if args.quiet else 1,
                   strategy=args.strategy)
    if not result.chief:
        return EXIT_INTERRUPTED if result.interrupted else EXIT_OK
    from .evaluation import format_report

    print(f"\nRun folder: {result.run_dir}  (model: {result.model_path})")
    _describe_onnx_copy(result.onnx_path)
    print(describe_threshold(result.threshold_choice))
    print(f"Scores on the {result.metrics['evaluated_on']} split:")
    print(format_report({**result.metrics, "patients": None}))
    return EXIT_INTERRUPTED if result.interrupted else EXIT_OK


def _describe_onnx_copy(path) -> None:
    if path is not None:
        print(f"ONNX copy: {path} (same labels on the validation cells; predict/serve --model {path} "
              "start without TensorFlow)")


def describe_threshold(choice: dict) -> str:
    """One line on how a run's threshold was chosen (``threshold_choice`` in its config.json)."""
    if choice["limited_by"] == "fixed":
        return f"Threshold {choice['threshold']:.4f} (fixed)"
    rule = (f"validation sensitivity target {choice['target_sensitivity']}" if choice["limited_by"] == "sensitivity"
            else f"validation specificity floor {choice['min_specificity']}, before the sensitivity target "
                 f"{choice['target_sensitivity']}")
    return (f"Threshold {choice['threshold']:.4f}, set by the {rule}: on validation patients sensitivity "
            f"{choice['sensitivity']:.4f}, specificity {choice['specificity']:.4f}")


def run_retune(args) -> int:
    from .evaluation import format_report
    from .training import retune

    result = retune(args.run, target_sensitivity=args.target_sensitivity, min_specificity=args.min_specificity,
                    data=args.data)
    _describe_onnx_copy(result.onnx_path)
    print(describe_threshold(result.threshold_choice))
    print(f"Scores on the {result.metrics['evaluated_on']} split:")
    print(format_report({**result.metrics, "patients": None}))
    return EXIT_OK


def run_evaluate(args) -> int:
    from .evaluation import evaluate, format_report

    metrics = evaluate(args.model, args.data, threshold=args.threshold,
                       batch_size=args.batch_size, plots=args.plots, tta=args.tta)
    if args.json:
        print(json.dumps(metrics, default=float))
    else:
        print(f"Model {metrics['model']} on {metrics['data']}")
        print(format_report(metrics))
        if args.plots:
            print(f"\nPlots written to {args.plots}")
    return EXIT_OK


class _ResultWriter:
    """Streams predictions as a table, CSV or JSON to stdout or (atomically) a file."""

    def __init__(self, form: str, stream, model):
        self.form, self.stream, self.count = form, stream, 0
        if form == "csv":
            self.csv = csv.writer(stream, lineterminator="\n")
            self.csv.writerow(["path", "probability", "label"])
        elif form == "json":
            stream.write(json.dumps({"model": model.path, "threshold": model.threshold})[:-1]
                         + ', "predictions": [')
        else:
            stream.write(f"{'probability':>11}  {'label':<11}  path\n")

    def write(self, prediction) -> None:
        if self.form == "csv":
            self.csv.writerow([prediction.path, f"{prediction.probability:.6f}", prediction.label])
        elif self.form == "json":
            row = {"path": prediction.path, "probability": round(prediction.probability, 6),
                   "label": prediction.label}
            self.stream.write(("," if self.count else "") + "\n  " + json.dumps(row))
        else:
            self.stream.write(f"{prediction.probability:>11.4f}  {prediction.label:<11}  {prediction.path}\n")
        self.count += 1

    def close(self, skipped) -> None:
        if self.form == "json":
            rows = [{"path": p, "reason": why} for p, why in skipped]
            self.stream.write("\n], \"skipped\": " + json.dumps(rows) + "}\n")


def run_predict(args) -> int:
    from .datasets import list_image_files
    from .files import atomic_path
    from .inference import predict_files
    from .runtimes import check_threshold, load_model

    model = load_model(args.model)
    if check_threshold(args.threshold) is not None:
        model.threshold = args.threshold
    if args.output and os.path.exists(args.output) and not args.overwrite:
        raise MalariaCellsError(f"{args.output}: already exists; choose another --output or pass --overwrite")
    files, skipped = list_image_files(args.paths)
    bar = _progress_bar(len(files))

    def emit(stream):
        writer = _ResultWriter(args.format, stream, model)
        for prediction in predict_files(files, model, model.threshold, batch_size=args.batch_size,
                                        tta=args.tta, skipped=skipped, check_crop=not args.any_image):
            writer.write(prediction)
            bar.update()
        writer.close(skipped)

    if args.output:
        with atomic_path(args.output) as temporary, open(temporary, "w", encoding="utf-8", newline="") as stream:
            emit(stream)
    else:
        emit(sys.stdout)
    bar.close()
    failed = [s for s in skipped if s[1] != "not an image file"]
    for path, reason in skipped:
        print(f"skipped: {path}: {reason}", file=sys.stderr)
    return EXIT_SKIPPED if failed else EXIT_OK


class _NoProgress:
    def update(self, count: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def _progress_bar(total: int, *, unit: str = "cell", minimum: int = 2000):
    """tqdm's bar where someone watches a long job (a terminal, ``minimum`` items or more);
    elsewhere nothing, and tqdm is not even imported, which shortens every short or scripted run."""
    if total < minimum or not sys.stderr.isatty():
        return _NoProgress()
    from tqdm import tqdm

    return tqdm(total=total, unit=unit, file=sys.stderr, mininterval=0.5)


def run_screen(args) -> int:
    from .fields import Screener
    from .fields.metadata import SampleMetadata, read_manifest

    if isinstance(args.truth, str) and not os.path.exists(args.truth):
        raise MalariaCellsError(f"--truth {args.truth}: no such file or folder (an annotations JSON file or folder, "
                                "or --truth alone for NIH point files beside the images)")
    defaults = SampleMetadata(**{name: getattr(args, name) for name in
                                 ("patient", "slide", "operator", "date", "site", "note")})
    manifest = read_manifest(args.manifest) if args.manifest else None
    options = {"classifier": args.model, "threshold": args.threshold, "max_field_seconds": args.max_field_seconds,
               "rbc_per_ul": args.rbc_per_ul}
    on_dask = args.workers is not None or args.scheduler is not None
    if args.workers is not None and args.scheduler is not None:
        raise MalariaCellsError("give --workers (a local cluster) or --scheduler (a running one), not both")
    # on a cluster each worker builds its own screener from the options
    screener = None if on_dask else Screener(**options)
    if args.output and os.path.exists(args.output) and not args.overwrite:
        raise MalariaCellsError(f"{args.output}: already exists; choose another --output or pass --overwrite")
    records = _records_for(args.db)  # a bad URL or an unreachable server fails before any screening
    try:
        return _screen_and_record(args, screener or options, manifest, defaults, records)
    finally:
        if records is not None:
            records.close()


def _records_for(db: str | None):
    """The records database ``--db`` (or ``$MALARIA_CELLS_DB``) names, opened; None when neither does."""
    from .records import DB_ENV, open_records

    db = db or os.environ.get(DB_ENV)
    return open_records(db) if db else None


def _screen_and_record(args, screener, manifest, defaults, records) -> int:
    from .fields import FORMATS, Screener, group_samples
    from .fields.metadata import attach_metadata
    from .fields import Gallery
    from .fields.report import ReportWriter
    from .files import atomic_path

    on_dask = isinstance(screener, dict)  # the options each Dask worker builds its screener from
    # on Dask the workers draw the overlays; the heat maps are drawn here, by a screener of the same options
    options = (Screener(**screener) if on_dask else screener).report_options() if args.out else {}
    report = ReportWriter(args.out, overwrite=args.overwrite, pdf=not args.no_pdf, pooled=args.pooled,
                          **options) if args.out else None
    # the cells a reviewer will see: the report's gallery, or one kept for the records alone
    gallery = report.gallery if report is not None else Gallery() if records is not None else None
    bar = _progress_bar(sum(len(files) for _, files in group_samples(args.paths)[0]), unit="field", minimum=2)
    if on_dask:
        result = _screen_on_dask(args, screener, manifest, defaults, records, report, gallery, bar.update)
        stage_error = (result.model.get("stage_model") or {}).get("error", "").removeprefix("stages off: ")
    else:
        result = screener.screen(args.paths, truth=args.truth, progress=bar.update,
                                 on_field=report.add if report else gallery.add if gallery else None)
        stage_error = screener.stage_error
    bar.close()
    if not result.fields:  # nothing to tabulate: say why, not an empty table with a call
        for path, reason in result.skipped:
            print(f"skipped: {path}: {reason}", file=sys.stderr)
        raise MalariaCellsError("no field could be screened" + (" (see the skipped files above)" if result.skipped else ""))
    for warning in attach_metadata(result, manifest, defaults):
        print(f"warning: {warning}", file=sys.stderr)
    if stage_error:
        print(f"warning: life stages not given: {stage_error}", file=sys.stderr)
    if report is not None:
        page = report.finish(result)
    write = FORMATS[args.format].write
    if args.output:
        with atomic_path(args.output) as temporary, open(temporary, "w", encoding="utf-8", newline="") as stream:
            write(result, stream, pooled=args.pooled)
    else:
        write(result, sys.stdout, pooled=args.pooled)
    for path, reason in result.skipped:
        print(f"skipped: {path}: {reason}", file=sys.stderr)
    if report is not None:
        for warning in report.warnings:
            print(f"warning: {warning}", file=sys.stderr)
        print(f"report: {page}", file=sys.stderr)
    if records is not None and not on_dask:  # on Dask each sample was recorded as it finished
        _record(records, result, args.out, gallery)
    return EXIT_SKIPPED if result.skipped else EXIT_OK


def _record(records, result, report_path, gallery) -> None:
    ids = records.add(result, report_path=report_path, source="cli", gallery=gallery)
    for sample, record_id in zip(result.samples, ids):
        print(f"recorded: sample {sample.name} as record {record_id} in {records.url}", file=sys.stderr)


def _screen_on_dask(args, options, manifest, defaults, records, report, gallery, progress):
    """``screen --workers/--scheduler``: the samples screened on Dask, each recorded as it finishes."""
    from .fields.distributed import screen_distributed
    from .fields.metadata import attach_metadata

    def record(part):
        attach_metadata(part, manifest, defaults)  # the identifiers the whole screen gets afterwards
        _record(records, part, args.out, gallery)

    return screen_distributed(args.paths, scheduler=args.scheduler, workers=args.workers or 2,
                              screener_options=options, truth=args.truth, report=report, gallery=gallery,
                              on_sample=record if records is not None else None, progress=progress)


def run_history(args) -> int:
    from .files import atomic_path
    from .records import open_records, write_history

    if args.output and os.path.exists(args.output) and not args.overwrite:
        raise MalariaCellsError(f"{args.output}: already exists; choose another --output or pass --overwrite")
    with open_records(args.db, create=False) as records:
        samples = records.samples(since=args.since, call=args.call, limit=args.limit)
    if args.output:
        with atomic_path(args.output) as temporary, open(temporary, "w", encoding="utf-8", newline="") as stream:
            write_history(samples, stream, args.format)
    else:
        write_history(samples, sys.stdout, args.format)
    return EXIT_OK


def run_download(args) -> int:
    from .download import NIH_URL, download

    root = download(args.dest, url=args.url or NIH_URL, sha256=args.sha256, verbose=0 if args.quiet else 1)
    print(f"Dataset ready: {root}\nTrain with: malaria-cells train --data {root} --out runs/first")
    return EXIT_OK


def run_serve(args) -> int:
    from .serving import ServeLimits, serve

    limits = ServeLimits(max_images=args.max_images, max_request_bytes=args.max_upload_mb * 2**20,
                         max_seconds=args.max_seconds, max_field_seconds=args.max_field_seconds,
                         screening_slots=args.screening_slots)
    from .records import DB_ENV

    serve(args.model, host=args.host, port=args.port, api_key=args.api_key, limits=limits, workers=args.workers,
          no_auth=args.no_auth, db=args.db or os.environ.get(DB_ENV) or None, user_keys=args.user_keys)
    return EXIT_OK


def run_export(args) -> int:
    from .export import check_parity, export_model
    from .runtimes import default_model_path, load_model

    from .datasets import find_dataset_root

    if os.path.exists(args.out) and not args.overwrite:
        raise MalariaCellsError(f"{args.out}: already exists; choose another --out or pass --overwrite")
    if args.check:
        find_dataset_root(args.check)  # a wrong folder fails before any work is done
    model = load_model(args.model or default_model_path(fast_start=False))
    calibration = _calibration_images(args.calibration, model) if args.quantize == "int8" else None
    out = export_model(model, args.out, format=args.format, quantize=args.quantize,
                       calibration_images=calibration)
    size = sum(p.stat().st_size for p in out.rglob("*")) if out.is_dir() else out.stat().st_size
    print(f"Wrote {out} ({size / 1e6:.2f} MB) and its metadata {out}.json" if not out.is_dir()
          else f"Wrote {out}/ ({size / 1e6:.2f} MB)")
    if args.check and args.format != "saved_model":
        parity = check_parity(model, out, args.check)
        passed = parity["agreement"] >= 0.995 and abs(parity["accuracy_difference_points"]) <= 0.3
        print(f"Check on {parity['n']} images: same label {parity['agreement']:.2%}, accuracy "
              f"{parity['keras_accuracy']:.2%} (keras) vs {parity['export_accuracy']:.2%} (export): "
              + ("passed" if passed else "FAILED"))
        return EXIT_OK if passed else EXIT_SKIPPED
    return EXIT_OK


def _calibration_images(folder, model, count: int = 400):
    import numpy as np

    from .datasets import list_image_files
    from .pipeline import read_images

    folder = folder or model.info.get("data", {}).get("root")
    if not folder or not os.path.isdir(folder):
        raise MalariaCellsError("int8 needs calibration images: pass --calibration DIR (a few hundred training cells)")
    files, _ = list_image_files([folder])
    if not files:
        raise MalariaCellsError(f"{folder}: no images for calibration")
    chosen = np.random.default_rng(0).permutation(len(files))[:count]
    images, _, _ = read_images([files[i] for i in sorted(chosen)], model.image_size)
    return images


def run_info(args) -> int:
    from .runtimes import DEFAULT_MODEL, DEFAULT_MODEL_ONNX, load_model

    model = load_model(args.model)
    keras_model = model.keras_model
    summary = {"model": model.path, "runtime": model.runtime, "image_size": model.image_size,
               "threshold": model.threshold,
               "parameters": int(keras_model.count_params()) if keras_model is not None else None,
               "file_bytes": os.path.getsize(model.path), "info": model.info}
    fields = _field_model_summary() if args.model is None else None
    if fields is not None:
        summary["field_model"] = fields
    if args.json:
        print(json.dumps(summary, indent=2, default=str))
        return EXIT_OK
    print(f"model       {summary['model']}")
    print(f"runtime     {model.runtime}")
    if Path(model.path) == DEFAULT_MODEL_ONNX:
        print(f"note        the shipped model's ONNX copy, run to start without TensorFlow; original: {DEFAULT_MODEL}")
    print(f"input       {model.image_size}x{model.image_size} RGB (colour handling and scaling inside the model)")
    print(f"threshold   {model.threshold:.4f}")
    parameters = f"{summary['parameters']:,}  " if keras_model is not None else ""
    print(f"size        {parameters}({summary['file_bytes'] / 1e6:.2f} MB on disk)")
    for key, value in model.info.items():
        print(f"{key:<11} {json.dumps(value, default=str) if isinstance(value, (dict, list)) else value}")
    if fields is not None:
        print(f"\nfield model {fields['model']}  (screen, /v1/screen)")
        print(f"counting    threshold {fields['counting_threshold']:.4f}; {fields['measured']}")
        if fields["shift_suite_failed"] is not None:
            print(f"shift suite floors failed: {', '.join(fields['shift_suite_failed']) or 'none'}")
        stages = fields.get("stage_model")
        if stages and stages["figures"]:
            recall = stages["figures"]["recall"]
            print(f"stage model {stages['path']}: leave-slide-out recall " + ", ".join(
                f"{stage} {value:.0%}" for stage, value in recall.items() if value is not None)
                + f"; too rare to trust: {', '.join(stages['figures']['too_rare']) or 'none'}")
    return EXIT_OK


def _field_model_summary() -> dict | None:
    """The shipped field model in brief: its file, counting threshold and measured figures."""
    from .fields import FieldFigures
    from .runtimes import default_model_path, load_model

    model = load_model(default_model_path(fields=True))
    figures = FieldFigures.from_model(model)
    if figures is None:
        return None
    nested = figures.nested
    found = nested.get("found_of_annotated_infected")
    measured = (f"by nested cross-validation over blocks of fields: {found[0]} of {found[1]} infected cells found, "
                f"false-positive rate {nested['false_positive_rate']:.2%}" if found and "false_positive_rate" in nested
                else f"sensitivity {figures.sensitivity:.1%}, specificity {figures.specificity:.2%}")
    from .fields import Screener

    return {"model": model.path, "counting_threshold": figures.threshold, "measured": measured,
            "shift_suite_failed": figures.shift_suite.get("failed") if figures.shift_suite else None,
            "figures": figures.to_info(), "stage_model": Screener(model).stage_description()}


def _needs_tensorflow(args: argparse.Namespace) -> bool:
    """Whether the command runs TensorFlow: not for downloads, nor for .tflite / .onnx
    models, which then start in a fraction of a second instead of seconds."""
    if args.command in ("download", "history"):
        return False
    if args.command in ("predict", "evaluate", "serve", "info", "screen"):
        from .runtimes import default_model_path

        model = args.model or default_model_path(fields=args.command == "screen")
        return Path(model).suffix.lower() not in (".tflite", ".onnx")
    return True


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``malaria-cells`` command; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    for stream in (sys.stdout, sys.stderr):  # file names that are not UTF-8 print as escapes
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    handler = {"train": run_train, "evaluate": run_evaluate, "predict": run_predict, "screen": run_screen,
               "download": run_download, "info": run_info, "serve": run_serve,
               "export": run_export, "retune": run_retune, "history": run_history}[args.command]
    try:
        if _needs_tensorflow(args):
            from .runtimes import import_tensorflow_quietly

            import_tensorflow_quietly()
        return handler(args)
    except MalariaCellsError as error:
        print(f"malaria-cells {args.command}: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:  # output piped into `head` and the like
        sys.stderr.close()
        return EXIT_OK
    except OSError as error:
        where = f"{error.filename}: " if error.filename else ""
        print(f"malaria-cells {args.command}: error: {where}{error.strerror or error}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as error:
        # A Ctrl-C inside TensorFlow (tracing a tf.data function) can surface as another
        # exception raised while handling it: still an interruption, not a crash.
        if not _caused_by_interrupt(error):
            raise
        print("\ninterrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def _caused_by_interrupt(error: BaseException) -> bool:
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, KeyboardInterrupt):
            return True
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return False


def run() -> int:
    """The ``malaria-cells`` program: :func:`main`, then an exit without the final garbage collection.

    At exit the interpreter collects every object left, and onnxruntime's are many; frozen
    objects are skipped, and the process ends right after, so nothing is kept that would have
    been freed.
    """
    import gc

    status = main()
    gc.freeze()
    return status
