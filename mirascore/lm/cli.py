"""The command line (docs/training.md, "Command line"): `mirascore train | sample | eval | plot`, also `python -m mirascore`.

Bad input of any kind (an unknown config key, a bad value, a missing file or run, a --resume
without a checkpoint, a --resume whose config differs) ends with status 2 and one line
`mirascore: error: ...` on stderr, never a traceback.
"""
import argparse
import contextlib
import json
import sys
from pathlib import Path

from . import data, device, rundir
from .config import load_config, replace, with_overrides

EXIT_USAGE = 2
PROG = "mirascore"
FINAL_SAMPLE_PROMPT, FINAL_SAMPLE_BYTES = "ROMEO:", 200
DEFAULT_LENGTHS = (1024, 2048, 4096)
DEFAULT_MQAR_SAMPLES = 512
TRAIN_EXTRA = ("tqdm", "safetensors", "matplotlib")      # the modules of the `train` extra


class UsageError(Exception):
    """Bad command-line input found by argparse."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):           # argparse would print the usage and exit: one line instead
        raise UsageError(message)


def _positive_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _lengths(text):
    try:
        values = tuple(int(t) for t in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated byte counts, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive byte counts, got {text!r}")
    return values


def build_parser():
    parser = _Parser(prog=PROG, description="Train, sample, evaluate and plot byte-level Miras language models.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="{train,sample,eval,plot}")

    p = commands.add_parser("train", help="train a model from a TOML config")
    p.add_argument("config", metavar="CONFIG.toml")
    p.add_argument("--out", metavar="DIR", help="run directory (default: runs/<config name>)")
    p.add_argument("--steps", type=_positive_int, help="total optimizer steps (the schedule spans them)")
    p.add_argument("--seed", type=int, help="initialisation and data-order seed")
    p.add_argument("--device", choices=device.DEVICES, help="where to train (default cpu; gpu with --gpus)")
    p.add_argument("--gpus", type=_positive_int, metavar="N", help="data-parallel over N GPUs, one process "
                   "each (NCCL); each trains on batch / N sequences of every step")
    p.add_argument("--data", metavar="PATH", help="a .txt/.raw/.txt.gz/.txt.xz file or a folder with train and "
                                                  "validation files (default: the embedded Tiny Shakespeare)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--checkpoint-every", type=int, metavar="N", help="steps between checkpoints (0: at the end only)")
    p.add_argument("--eval-every", type=int, metavar="N", help="steps between validation passes (0: at the end only)")
    p.add_argument("--quiet", action="store_true", help="log lines instead of a progress bar")
    p.add_argument("--set", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                   help="override a config key (TOML value syntax; rule.<name> for rule hyperparameters)")

    p = commands.add_parser("sample", help="continue a prompt with a trained model")
    p.add_argument("run", metavar="RUN_DIR")
    p.add_argument("--prompt", required=True, metavar="TEXT")
    p.add_argument("--tokens", type=int, default=200, metavar="N", help="bytes to generate (default 200)")
    p.add_argument("--temperature", type=float, default=None, metavar="X", help="0 = greedy (default 0.8)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", choices=device.DEVICES, default="cpu")

    p = commands.add_parser("eval", help="evaluate a trained model")
    p.add_argument("run", metavar="RUN_DIR")
    p.add_argument("--task", required=True, choices=("bpb", "niah", "lambada", "mqar"))
    p.add_argument("--data", metavar="PATH", help="bpb: a text file or data folder (default: the run's "
                   "validation data); lambada: lambada_test.jsonl or its folder; niah: a ruler_niah folder")
    p.add_argument("--split", choices=("validation", "test", "all"), default="validation",
                   help="bpb: a data folder's validation or test file; a single file's last 10 %% "
                        "(validation, as training splits it) or all of it (default validation)")
    p.add_argument("--max-bytes", type=_positive_int, metavar="N", help="bpb: only the first N bytes")
    p.add_argument("--lengths", type=_lengths, default=DEFAULT_LENGTHS, metavar="L1,L2,...",
                   help="niah: prompt + answer lengths in bytes (default 1024,2048,4096)")
    p.add_argument("--samples", type=_positive_int, metavar="N",
                   help="niah: samples per task and length (default 10); lambada: the first N examples; "
                        "mqar: held-out sequences (default 512)")
    p.add_argument("--seed", type=int, default=0, help="mqar: seed of the held-out sequences (default 0)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--device", choices=device.DEVICES, default="cpu")

    p = commands.add_parser("plot", help="loss and validation curves of runs on one figure")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR")
    p.add_argument("--out", metavar="PNG", help="default: <first RUN_DIR>/curves.png")
    return parser


# ------------------------------------------------------------------ train

def train_config(args):
    """The config a `train` command line asks for: the file, then --set, then the flags."""
    cfg = with_overrides(load_config(args.config), args.set)
    flags = {"steps": args.steps, "seed": args.seed, "checkpoint_every": args.checkpoint_every,
             "eval_every": args.eval_every}
    return replace(cfg, **{k: v for k, v in flags.items() if v is not None})


def cmd_train(args):
    from . import train
    from .sample import DEFAULT_TEMPERATURE, decode_text, generate
    cfg = train_config(args)
    out = Path(args.out) if args.out else Path("runs") / Path(args.config).stem
    if args.gpus is not None and args.device == "cpu":
        raise ValueError(f"--gpus {args.gpus} trains on GPUs: drop --device cpu")
    output = "log" if args.quiet else "bar"
    if args.gpus is not None and args.gpus > 1:
        from . import launch
        result = launch.run(cfg, out, gpus=args.gpus, data_path=args.data, resume=args.resume, output=output)
    else:                             # --gpus 1 is --device gpu: one process, no NCCL
        device_name = "gpu" if args.gpus else args.device or "cpu"
        result = train.run(cfg, out, data_path=args.data, device_name=device_name, resume=args.resume,
                           output=output)
    val = "n/a" if result.val_bpb is None else f"{result.val_bpb:.4f}"
    accuracy = [row["val_acc"] for row in rundir.read_metrics(out) if "val_acc" in row]
    val += f", val acc {accuracy[-1]:.4f}" if accuracy else ""          # mqar runs
    print(f"done: {result.step} steps, {result.tokens:,} tokens, {result.elapsed_s:.1f} s, "
          f"final val bpb {val} ({out})", flush=True)
    if args.data is None and cfg.task == "lm":
        text = generate(result.params, cfg, FINAL_SAMPLE_PROMPT.encode(), FINAL_SAMPLE_BYTES,
                        temperature=DEFAULT_TEMPERATURE, seed=0)
        print(f"sample (temperature {DEFAULT_TEMPERATURE}, seed 0):\n{FINAL_SAMPLE_PROMPT}{decode_text(text)}")


# ------------------------------------------------------------------ sample

def cmd_sample(args):
    from .sample import DEFAULT_TEMPERATURE, decode_text, generate
    cfg, params, _ = rundir.load(args.run, device.array_module(args.device))
    temperature = DEFAULT_TEMPERATURE if args.temperature is None else args.temperature
    text = generate(params, cfg, args.prompt.encode(), args.tokens, temperature=temperature, seed=args.seed)
    print(args.prompt + decode_text(text))


# ------------------------------------------------------------------ eval

@contextlib.contextmanager
def counter(total, unit, quiet):
    """A tqdm bar on stderr (none when quiet) and the function that advances it."""
    if quiet:
        yield None
        return
    from tqdm.auto import tqdm
    with tqdm(total=total, unit=unit, file=sys.stderr, dynamic_ncols=True, leave=False) as bar:
        yield bar.update


def _bpb_text(args, run_info):
    """(held-out bytes, a description of where they come from) for eval --task bpb."""
    if args.data is None:
        corpus = data.load_corpus(data.path_of_source(run_info.get("data", data.EMBEDDED_SOURCE)))
        return corpus.validation, f"{corpus.source}, validation: {corpus.split}"
    path = Path(args.data)
    if path.is_dir():
        if args.split == "all":
            raise ValueError(f"--split all reads a single file; --data {str(path)!r} is a folder "
                             f"(choose its validation or test file)")
        file = data.split_file(path, args.split)
        return data.read_array(file), f"{file.resolve()} (its {args.split} file)"
    if args.split == "test":
        raise ValueError(f"--split test reads a data folder's test file; --data {str(path)!r} is a "
                         f"single file (--split all evaluates all of it)")
    if args.split == "all":
        data.load_corpus(path)                    # the same checks of the path and its suffix
        return data.read_array(path), f"{path.resolve()} (all of it)"
    corpus = data.load_corpus(path)
    return corpus.validation, f"{corpus.source}, validation: {corpus.split}"


def _mqar_report(args, cfg, params):
    """eval --task mqar: accuracy on freshly generated sequences of the run's MQAR settings, from the
    generator's test stream (never a training or validation sequence's stream)."""
    from . import mqar
    if args.data is not None:
        raise ValueError("eval --task mqar takes no --data: its sequences are generated")
    mqar.check(1, cfg.mqar_pairs, cfg.context, cfg.vocab, cfg.mqar_power_a)
    samples = args.samples or DEFAULT_MQAR_SAMPLES
    scores = mqar.evaluate(params, cfg, mqar.held_out(cfg, samples, args.seed))
    return scores | {"samples": samples, "pairs": cfg.mqar_pairs, "context": cfg.context,
                     "vocab": cfg.vocab, "power_a": cfg.mqar_power_a, "seed": args.seed}


def cmd_eval(args):
    from . import evaluate
    cfg, params, state = rundir.load(args.run, device.array_module(args.device))
    report = {"task": args.task, "run": str(args.run), "step": state["step"]}
    if args.task == "bpb":
        text, where = _bpb_text(args, rundir.read_info(args.run))
        text = text[:args.max_bytes]
        with counter(len(text) // cfg.context, "windows", args.json) as tick:
            report |= evaluate.text_bpb(params, cfg, text, progress=tick)
        report["data"] = where
        line = f"bpb {report['bpb']:.4f} over {report['bytes']:,} bytes of {where}"
    elif args.task == "lambada":
        if args.data is None:
            raise ValueError("eval --task lambada needs --data (lambada_test.jsonl or its folder)")
        pairs = evaluate.read_lambada(args.data, limit=args.samples)
        with counter(len(pairs), "examples", args.json) as tick:
            report |= evaluate.lambada(params, cfg, pairs, progress=tick)
        line = (f"lambada: acc {report['acc']:.4f}, ppl {report['ppl']:.2f}, byte ppl {report['byte_ppl']:.3f}, "
                f"bpb {report['bpb']:.4f} ({report['examples']} examples)")
    elif args.task == "mqar":
        report |= _mqar_report(args, cfg, params)
        line = (f"mqar: acc {report['acc']:.4f}, loss {report['loss']:.4f} over {report['queries']:,} queries "
                f"({report['samples']} sequences of {cfg.context} tokens, {cfg.mqar_pairs} pairs, seed {args.seed})")
    else:
        if args.data is None:
            raise ValueError("eval --task niah needs --data (a ruler_niah folder)")
        from .niah import TASKS, load_assets
        samples = args.samples or 10
        assets = load_assets(args.data)
        with counter(len(TASKS) * len(args.lengths) * samples, "samples", args.json) as tick:
            result = evaluate.niah(params, cfg, assets, args.lengths, samples, progress=tick)
        report |= {"samples": samples} | result
        line = "\n".join(f"{task} " + "  ".join(f"{n}: {score:5.1f} ({result['answer_bpb'][task][n]:.2f} bpb)"
                                                for n, score in by_length.items())
                         for task, by_length in result["scores"].items())
    print(json.dumps(report) if args.json else line)


# ------------------------------------------------------------------ plot

def cmd_plot(args):
    from .plot import plot_runs
    out = Path(args.out) if args.out else Path(args.runs[0]) / "curves.png"
    plot_runs(args.runs, out)
    print(f"wrote {out}")


COMMANDS = {"train": cmd_train, "sample": cmd_sample, "eval": cmd_eval, "plot": cmd_plot}


def main(argv=None):
    """Run one command; returns the exit status (0, or 2 for bad input, 130 when interrupted)."""
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(errors="replace")      # samples print on any terminal encoding
    try:
        args = build_parser().parse_args(argv)
        COMMANDS[args.command](args)
    except (UsageError, ValueError, OSError) as e:     # OSError: FileNotFoundError, NotADirectoryError, ...
        print(f"{PROG}: error: {_one_line(e)}", file=sys.stderr)
        return EXIT_USAGE
    except ModuleNotFoundError as e:
        missing = (e.name or "").split(".")[0]
        if missing not in TRAIN_EXTRA:
            raise
        print(f"{PROG}: error: {missing} is not installed: pip install 'mirascore[train]'", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    return 0


def _one_line(error):
    return " ".join(str(error).split()) or type(error).__name__
