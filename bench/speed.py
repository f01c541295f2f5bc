"""Issues 27 and 36's targets, each measured side by side in one run: mapping speed of the
new defaults against the old, the engines (ONNX Runtime against PyTorch), bf16 against fp32,
training steps, ingest against a raw read, and the authors' tiling rule.

    python bench/speed.py [--threads 2] [--scene-px 1536] [--reps 3] [--train-batch 2]
                          [--ingest-px 10000] [--cache .cache/bench-context]
                          [--skip ingest,train,...]

Prints one line per target, in the issue's form, after the tables they come from, and
first the host's CPU capability and what ``engine: auto`` and ``precision: auto`` resolve
to on it (``relay_models.engines.resolve_engine``):

* ``small relay mapping km2/h, new default / old default (this host)``:
  ``swinv2_small_relay`` (``256 + 1024↓4``, random weights: speed does not depend on them)
  maps one ``--scene-px`` square scene through ``predict_array`` with today's defaults
  (overlap an eighth of a tile, ``engine="auto"`` with ``precision="auto"``, the default
  batch) and with the old ones (a quarter tile, PyTorch fp32, batch 8), in turn,
  ``--reps`` times; medians. Also the new defaults as ``auto`` resolves them on a CPU
  without native bf16 (an AVX2 host: ONNX Runtime, fp32), forced here, and PyTorch at
  bf16 and fp32 with the new tiling. ``mIoU change``: the
  same two settings on the context benchmark's trained ``swinv2_nano_relay`` (each seed
  in ``--cache``, ``bench/overlap.py`` trains them), its two held-out scenes per seed.
* ``onnxruntime / torch fp32 forward``: the forward pass alone on batches of random
  tiles (``swinv2_small_relay`` at 256 px, batch 8, and ``swinv2_nano_relay`` at 64 px,
  batch 32, each model's default batch), ONNX Runtime (the export of
  ``relay_models.engines.export_onnx``, ``--threads`` intra-op threads) against PyTorch
  fp32 (and bf16), tiles per CPU second, in turn; the line gives the small model's.
* ``km2/h vs authors``: the new defaults against the authors' published tiling rule,
  re-implemented here (their code cannot run on this machine, see ``docs/benchmarks.md``):
  half a tile of overlap, each pixel from the nearest tile centre, fp32 (their trainer's
  default precision); same scene and models; mIoU on the held-out scenes as above.
* ``bf16 / fp32 pixel agreement``: ``bench/precision.py``'s comparison on the cached
  ``swinv2_nano_relay`` of the first seed (``bench/precision.py`` does every model).
* ``training steps/s bf16 / fp32``: ``train_step`` of ``swinv2_small_relay`` at 256 px,
  batch ``--train-batch``, bf16 autocast and fp32 in turn.
* ``ingest / raw read (local disk)``: ``bench/ingest.py`` on a ``--ingest-px`` scene, COGs
  and store on local disk; with ``--s3``, the same on the local S3 server beside it.
"""

from __future__ import annotations

import copy
import datetime as dt
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from context import parser  # noqa: E402
from overlap import add_data_options, finish_args, held_out, trained  # noqa: E402
from precision import compare  # noqa: E402

#: The settings compared: (overlap as a fraction of the tile or None for the default,
#: blend, precision, engine, batch size or None for the default).
NEW = {"overlap": None, "blend": "cosine", "precision": "auto", "engine": "auto", "batch": None}
OLD = {"overlap": 0.25, "blend": "cosine", "precision": "fp32", "engine": "torch", "batch": 8}
AUTHORS = {"overlap": 0.5, "blend": "center", "precision": "fp32", "engine": "torch", "batch": 8}
SETTINGS = {"new default": NEW, "old default": OLD, "authors' rule (re-implemented)": AUTHORS}
#: Speed only: the new defaults as ``auto`` resolves them on an AVX2-only host, and each
#: engine alone with the new tiling.
SPEED_ONLY = {
    "new default as on an AVX2 host (onnxruntime fp32)": NEW
    | {"precision": "fp32", "engine": "onnxruntime"},
    "new tiling, torch bf16": NEW | {"precision": "bf16", "engine": "torch"},
    "new tiling, torch fp32": NEW | {"precision": "fp32", "engine": "torch"},
}

#: ONNX exports made in this run, by (model, tile side): each model is exported once.
_EXPORTS: dict[tuple[int, int], object] = {}


def _engine(model, tile_px: int, setting: dict):
    """What runs ``model`` for ``setting``: the model itself (torch), or an ONNX Runtime
    session of its export (made once per model and tile side, timed apart)."""
    import torch

    from relay_models.engines import OnnxEngine, export_onnx, resolve_engine

    if resolve_engine(setting["engine"], setting["precision"], "cpu") == "torch":
        return model
    key = (id(model), tile_px)
    if key not in _EXPORTS:
        t0 = time.perf_counter()
        data = export_onnx(model, tile_px)
        print(f"  ONNX export of {model.config.name}: {time.perf_counter() - t0:.0f} s", flush=True)
        _EXPORTS[key] = OnnxEngine(data, model.spec, threads=torch.get_num_threads())
    return _EXPORTS[key]


def _map(model, image, tile_px: int, setting: dict):
    from relay_models import predict_array

    overlap = setting["overlap"]
    return predict_array(
        _engine(model, tile_px, setting),
        image,
        tile_px=tile_px,
        overlap_px=None if overlap is None else round(overlap * tile_px),
        blend=setting["blend"],
        precision=setting["precision"],
        batch_size=setting["batch"],
    )


_MODELS: dict[str, object] = {}


def _model(name: str):
    """``name`` with random weights (seed 0), one instance per run (one export each)."""
    import torch

    from relay_models import create_model

    if name not in _MODELS:
        torch.manual_seed(0)
        _MODELS[name] = create_model(name, num_classes=10).eval()
    return _MODELS[name]


def mapping_speed(args) -> dict[str, float]:
    """km2/h of ``swinv2_small_relay`` over one scene per setting, in turn; medians."""
    import torch

    model = _model("swinv2_small_relay")
    image = torch.rand(3, args.scene_px, args.scene_px).numpy()
    km2 = args.scene_px**2 * 1e-4  # 10 m pixels
    settings = SETTINGS | SPEED_ONLY
    if "authors" in args.skip_set:  # the slowest setting; only "km2/h vs authors" needs it
        settings.pop("authors' rule (re-implemented)")
    for setting in settings.values():  # warm-up (and the export, once)
        _map(model, image[:, :512, :512], 256, setting)
    times: dict[str, list[float]] = {k: [] for k in settings}
    cpu: dict[str, list[float]] = {k: [] for k in settings}
    for rep in range(args.reps):
        for name, setting in settings.items():
            t0, c0 = time.perf_counter(), time.process_time()
            _map(model, image, 256, setting)
            times[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
            print(
                f"  mapping {name}, rep {rep}: {times[name][-1]:.1f} s ({cpu[name][-1]:.1f} CPU s)",
                flush=True,
            )
    rate = {k: km2 / (statistics.median(v) / 3600) for k, v in times.items()}
    return rate | {
        f"{k} (per CPU hour)": km2 / (statistics.median(v) / 3600) for k, v in cpu.items()
    }


def mapping_miou(args) -> dict[str, list[float]]:
    """mIoU per setting and seed of the cached ``swinv2_nano_relay`` on its held-out scenes."""
    import torch

    from relay_models import ConfusionMatrix

    out: dict[str, list[float]] = {k: [] for k in SETTINGS}
    for seed in args.seed_list:
        model, urls = trained(args, seed, "swinv2_nano_relay", args.cache)
        arrays = held_out(urls)
        for name, setting in SETTINGS.items():
            cm = ConfusionMatrix(model.num_classes)
            for image, labels in arrays:
                probs = _map(model, image, args.window_px, setting)
                cm.update(probs.argmax(0), torch.from_numpy(labels.astype("int64")))
            out[name].append(cm.miou())
    return out


def training_speed(args) -> dict[str, float]:
    """steps/s of ``train_step`` for ``swinv2_small_relay`` at 256 px, fp32 and bf16 in turn."""
    import torch

    from relay_models import RelayLoss, create_model, train_step
    from relay_models.precision import autocast

    torch.manual_seed(0)
    model = create_model("swinv2_small_relay", num_classes=10).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    b, side = args.train_batch, 256
    batch = {
        "local": torch.randn(b, 3, side, side),
        "global": torch.randn(b, 3, side, side),
        "labels": torch.randint(0, 10, (b, side, side)),
    }
    loss_fn = RelayLoss(factor=4)
    times: dict[str, list[float]] = {"fp32": [], "bf16": []}
    for rep in range(args.train_reps + 1):  # the first round warms up
        for precision in times:
            t0 = time.perf_counter()
            train_step(model, batch, loss_fn, opt, autocast=autocast(precision, "cpu"))
            if rep:
                times[precision].append(time.perf_counter() - t0)
            print(f"  train step {precision}: {time.perf_counter() - t0:.1f} s", flush=True)
    return {k: 1 / statistics.median(v) for k, v in times.items()}


def ingest_speed(args, where: str) -> dict[str, dict]:
    import contextlib
    import os
    import tempfile

    from bench.ingest import measure

    with contextlib.ExitStack() as stack:
        if where == "s3":
            from relaymap.catalog.local_s3 import seaweedfs

            s3 = stack.enter_context(seaweedfs(buckets=("bench",)))
            os.environ.update(s3.env())
            return measure(args.ingest_px, "s3://bench", s3.env(), s3.pid, repeat=args.reps)
        tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-speed-"))
        return measure(args.ingest_px, f"file://{tmp}", {}, None, repeat=args.reps)


def engine_forward(args) -> list[dict]:
    """The forward pass alone, per engine, on random tiles: tiles per CPU second and per
    wall second (medians of ``--exp-reps``, in turn after a warm-up), and how close ONNX
    Runtime's probabilities are to PyTorch fp32's."""
    import torch

    from relay_models.engines import TorchEngine

    rows = []
    for name, side, batch in (("swinv2_small_relay", 256, 8), ("swinv2_nano_relay", 64, 32)):
        model = _model(name)
        x = torch.randn(batch, 3, side, side, generator=torch.Generator().manual_seed(1))
        engines = {
            "onnxruntime fp32": _engine(
                model, side, {"engine": "onnxruntime", "precision": "fp32"}
            ),
            "torch fp32": TorchEngine(model, precision="fp32"),
            "torch bf16": TorchEngine(model, precision="bf16"),
        }
        ref, ours = engines["torch fp32"](x, x), engines["onnxruntime fp32"](x, x)
        cpu: dict[str, list[float]] = {k: [] for k in engines}
        wall: dict[str, list[float]] = {k: [] for k in engines}
        for rep in range(args.exp_reps + 1):  # the first round warms up
            for k, engine in engines.items():
                t0, c0 = time.perf_counter(), time.process_time()
                engine(x, x)
                if rep:
                    cpu[k].append(time.process_time() - c0)
                    wall[k].append(time.perf_counter() - t0)
        row = {"model": f"{name} {side} px, batch {batch}"}
        for k in engines:
            row[k] = (batch / statistics.median(cpu[k]), batch / statistics.median(wall[k]))
        row["same classes"] = float((ours.argmax(1) == ref.argmax(1)).float().mean())
        row["max |dp|"] = float((ours - ref).abs().max())
        print(f"  forward {row}", flush=True)
        rows.append(row)
    return rows


def _rates(a, xa, b, xb, reps: int) -> tuple[float, float]:
    """Median tiles per CPU second of ``a(xa)`` and ``b(xb)``, called in turn ``reps``
    times after a warm-up of each. CPU seconds of this process, not wall time: on a machine
    shared with other jobs, wall time also counts their share (with one torch thread, as
    the area job's actors run, CPU time is the model's work)."""
    a(xa), b(xb)
    ta, tb = [], []
    for _ in range(reps):
        for fn, x, out in ((a, xa, ta), (b, xb, tb)):
            t0 = time.process_time()
            fn(x)
            out.append(time.process_time() - t0)
    return xa.shape[0] / statistics.median(ta), xb.shape[0] / statistics.median(tb)


def experiments(args) -> list[tuple[str, str, float, str]]:
    """What the field uses for CPU inference, each against the plain fp32 forward pass
    (``predict_tiles``: inference mode, local branch, softmax; batch 8) on random tiles,
    in turn: other batch sizes, channels-last, no_grad instead of inference_mode,
    ``torch.compile`` (inductor, compiled once) and ONNX Runtime on the exported model
    (when importable; ``--ort-path`` adds a folder with it to ``sys.path``). Rows: (model,
    what, speed-up, note)."""
    import torch

    from relay_models import create_model, predict_tiles

    if args.ort_path:
        sys.path.append(args.ort_path)
    rows, reps = [], args.exp_reps
    for name, side, batches in (
        ("swinv2_nano_relay", 64, (16, 32, 64)),
        ("swinv2_small_relay", 256, (4, 16)),
    ):
        torch.manual_seed(0)
        model = create_model(name, num_classes=10).eval()
        x_all = torch.randn(max(batches), 3, side, side)
        x = x_all[:8]

        def plain(t, m=model):
            return predict_tiles(m, t, t)

        def row(what: str, rate: float, ref: float, note: str = "", name: str = name) -> None:
            rows.append((name, what, rate / ref, f"{rate:.1f} vs {ref:.1f} tiles/s{note}"))
            print(f"  {name} {what}: {rate / ref:.2f}x", flush=True)

        for b in batches:
            row(f"batch {b} (vs 8)", *_rates(plain, x_all[:b], plain, x, reps))
        last = copy.deepcopy(model).to(memory_format=torch.channels_last)

        def channels_last(t, m=last):
            t = t.contiguous(memory_format=torch.channels_last)
            return predict_tiles(m, t, t)

        row("channels-last", *_rates(channels_last, x, plain, x, reps))

        def no_grad(t, m=model):
            with torch.no_grad():
                return m.predict_local(t, t).float().softmax(1)

        row("no_grad instead of inference_mode", *_rates(no_grad, x, plain, x, reps))
        t0 = time.perf_counter()
        try:
            compiled = torch.compile(model)

            def comp(t, m=compiled):
                return predict_tiles(m, t, t)

            same = float((comp(x).argmax(1) == plain(x).argmax(1)).float().mean())
            note = f"; compile {time.perf_counter() - t0:.0f} s, same classes {same:.4f}"
            row("torch.compile (inductor)", *_rates(comp, x, plain, x, reps), note)
        except Exception as e:  # a failed compile is a result here, not a crash
            rows.append((name, "torch.compile", float("nan"), f"failed: {type(e).__name__}"))
        rows.append(_onnx_runtime(model, plain, x, reps, name))
        print(f"  {name} ONNX Runtime: {rows[-1][2]:.2f}x ({rows[-1][3]})", flush=True)
    return rows


def _onnx_runtime(model, fwd, x, reps: int, name: str) -> tuple[str, str, float, str]:
    """The model exported to ONNX (local branch + softmax) and run by ONNX Runtime's CPU
    provider with as many threads as torch, against the PyTorch forward pass."""
    import tempfile

    import torch

    try:
        import onnxruntime as ort
    except ImportError:
        return (name, "ONNX Runtime", float("nan"), "onnxruntime not importable")

    class Local(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, local, global_):
            return self.m.predict_local(local, global_).float().softmax(1)

    with tempfile.TemporaryDirectory() as tmp:
        path = f"{tmp}/model.onnx"
        try:
            torch.onnx.export(
                Local(model).eval(), (x, x), path, input_names=["local", "global"], dynamo=False
            )
        except Exception as e:
            return (
                name,
                "ONNX Runtime",
                float("nan"),
                f"export failed: {type(e).__name__}: {e}"[:120],
            )
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = torch.get_num_threads()
        opts.inter_op_num_threads = 1
        sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
        feed = {"local": x.numpy(), "global": x.numpy()}
        ref_out = fwd(x)
        out = torch.from_numpy(sess.run(None, feed)[0])
        same = float((out.argmax(1) == ref_out.argmax(1)).float().mean())
        rate, ref = _rates(lambda _: sess.run(None, feed), x, fwd, x, reps)
    return (
        name,
        "ONNX Runtime (CPU provider)",
        rate / ref,
        f"same classes {same:.4f}, max |dp| {float((out - ref_out).abs().max()):.1e}",
    )


def main() -> None:
    import torch

    p = parser(__doc__.splitlines()[0])
    add_data_options(p)
    p.add_argument("--scene-px", type=int, default=1536)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--train-batch", type=int, default=2)
    p.add_argument("--train-reps", type=int, default=2)
    p.add_argument("--ingest-px", type=int, default=10000)
    p.add_argument("--s3", action="store_true", help="also ingest on the local S3 server")
    p.add_argument(
        "--skip",
        default="",
        help="comma-separated: forward,speed,authors,miou,agree,train,ingest",
    )
    p.add_argument("--experiments", action="store_true", help="only the things tried")
    p.add_argument("--exp-reps", type=int, default=3)
    p.add_argument("--ort-path", default=None, help="a folder holding onnxruntime")
    args = finish_args(p.parse_args())
    skip = args.skip_set = set(filter(None, args.skip.split(",")))
    torch.set_num_threads(args.threads)
    if args.experiments:
        rows = experiments(args)
        print(f"\n# {torch.get_num_threads()} threads; speed-up over the plain fp32 forward pass\n")
        print("| model | tried | speed-up | note |\n|---|---|---:|---|")
        for name, what, x, note in rows:
            print(f"| {name} | {what} | {x:.2f}x | {note} |")
        return
    import onnxruntime

    from relay_models.engines import auto_rule

    host = (
        f"host: CPU capability {torch.backends.cpu.get_cpu_capability()}; engine and "
        f"precision auto = {auto_rule('cpu')}"
    )
    print(
        f"# {dt.date.today()}; torch {torch.__version__}, onnxruntime "
        f"{onnxruntime.__version__}, {torch.get_num_threads()} threads; {host}",
        flush=True,
    )
    lines = []
    if "forward" not in skip:
        rows = engine_forward(args)
        print("\n| model | engine | tiles per CPU s | tiles/s (wall) |\n|---|---|---:|---:|")
        for row in rows:
            for k in ("onnxruntime fp32", "torch fp32", "torch bf16"):
                print(f"| {row['model']} | {k} | {row[k][0]:.2f} | {row[k][1]:.2f} |")
            print(
                f"\n{row['model']}: onnxruntime vs torch fp32, same classes "
                f"{row['same classes']:.4f}, max |dp| {row['max |dp|']:.1e}"
            )
        small = rows[0]
        lines.append(
            "onnxruntime / torch fp32 forward: "
            f"{small['onnxruntime fp32'][0] / small['torch fp32'][0]:.2f}"
        )
    if "speed" not in skip:
        rate = mapping_speed(args)
        print("\n| setting | km2/h |\n|---|---:|")
        for k, v in rate.items():
            print(f"| {k} | {v:,.1f} |")
        cpu_ratio = rate["new default (per CPU hour)"] / rate["old default (per CPU hour)"]
        print(f"\nnew / old per CPU second: {cpu_ratio:.2f}")
        avx2 = "new default as on an AVX2 host (onnxruntime fp32)"
        lines += [
            host,
            "small relay mapping km2/h, new default / old default (this host): "
            f"{rate['new default'] / rate['old default']:.2f}",
            "small relay mapping km2/h, new default / old default (the AVX2 host's choice, "
            f"onnxruntime fp32, forced): {rate[avx2] / rate['old default']:.2f}",
        ]
    if "miou" not in skip:
        miou = mapping_miou(args)
        print("\n| setting | " + " | ".join(f"mIoU seed {s}" for s in args.seed_list) + " |")
        print("|---|" + "---:|" * len(args.seed_list))
        for k, v in miou.items():
            print(f"| {k} | " + " | ".join(f"{100 * x:.2f}" for x in v) + " |")
        d_old = [
            100 * (a - b) for a, b in zip(miou["new default"], miou["old default"], strict=True)
        ]
        d_auth = [
            100 * (a - b)
            for a, b in zip(
                miou["new default"], miou["authors' rule (re-implemented)"], strict=True
            )
        ]
        lines.append(f"mIoU change: {statistics.fmean(d_old):+.2f}")
        if not {"speed", "authors"} & skip:
            ratio = rate["new default"] / rate["authors' rule (re-implemented)"]
            lines.append(
                f"km2/h vs authors: {ratio:.2f} (their tiling rule re-implemented; mIoU "
                f"{statistics.fmean(d_auth):+.2f})"
            )
    if "agree" not in skip:
        model, urls = trained(args, args.seed_list[0], "swinv2_nano_relay", args.cache)
        r = compare(model, held_out(urls))
        print(
            f"\nbf16 vs fp32, swinv2_nano_relay seed {args.seed_list[0]}: mIoU "
            f"{100 * r['miou_fp32']:.2f} -> {100 * r['miou_bf16']:.2f}; "
            f"{r['seconds_fp32']:.1f} s -> {r['seconds_bf16']:.1f} s"
        )
        lines.append(f"bf16 / fp32 pixel agreement: {r['agreement']:.4f}")
    if "train" not in skip:
        steps = training_speed(args)
        print(f"\ntraining steps/s: fp32 {steps['fp32']:.3f}, bf16 {steps['bf16']:.3f}")
        lines.append(f"training steps/s bf16 / fp32: {steps['bf16'] / steps['fp32']:.2f}")
    if "ingest" not in skip:
        for where in ("local", "s3") if args.s3 else ("local",):
            res = ingest_speed(args, where)
            for step, r in res.items():
                print(
                    f"\ningest {where} {args.ingest_px}^2 {step}: {r['seconds']:.1f} s, "
                    f"CPU {r['cpu']:.1f} s, S3 server CPU {r['server_cpu']:.1f} s, "
                    f"peak RSS {r['rss_mb']:.0f} MB"
                )
            ratio = res["ingest"]["seconds"] / res["read"]["seconds"]
            label = "local disk" if where == "local" else "S3, local SeaweedFS"
            lines.append(f"ingest / raw read ({label}): {ratio:.2f}")
    print()
    for line in lines:
        print(line)


if __name__ == "__main__":
    main()
