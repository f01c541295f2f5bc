"""The relaymap command line."""

from __future__ import annotations

import subprocess

from click.testing import CliRunner

from relay_models import list_models
from relaymap.flows.cli import main


def test_console_script_is_installed():
    out = subprocess.run(["relaymap", "--help"], capture_output=True, text=True, check=True)
    assert out.stdout.startswith("Usage: relaymap") and "models" in out.stdout


def test_models_lists_the_registry():
    result = CliRunner().invoke(main, ["models"])
    assert result.exit_code == 0, result.output
    listed = [line.split()[0] for line in result.output.splitlines()[1:]]
    assert listed == list_models()


def test_models_flops_shows_relay_cost():
    result = CliRunner().invoke(main, ["models", "vit_small*", "--flops"])
    assert result.exit_code == 0, result.output
    row = next(line for line in result.output.splitlines() if line.startswith("vit_small_relay "))
    overhead, ratio = row.split()[2], float(row.split()[4].rstrip("x"))
    assert overhead.startswith("+1.") and 1.9 <= ratio <= 2.2


def test_unknown_pattern_is_a_clear_error():
    result = CliRunner().invoke(main, ["models", "resnet*"])
    assert result.exit_code == 2
    assert "no model matches 'resnet*'" in result.output


def test_train_rejects_a_bad_config_before_starting(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(
        "model: {name: swinv2_nano_relay, num_classes: 6}\n"
        "data: {train: [x.zarr], window_px: 64}\noptim: {stepz: 10}\n"
    )
    result = CliRunner().invoke(main, ["train", str(path)])
    assert result.exit_code == 2
    assert result.output == f"relaymap: SettingsError: {path}: optim.stepz: unknown key\n"


def test_usage_a_bad_key_in_config_and_a_bad_flag_name_the_field_the_same_way(tmp_path):
    path = tmp_path / "infer.yaml"
    path.write_text("model: m.safetensors\nscene: s.zarr\nout: o\noptions: {tile_px: 8}\n")
    in_file = CliRunner().invoke(main, ["infer", "--config", str(path)])
    as_flag = CliRunner().invoke(
        main, ["infer", "--model", "m.safetensors", "--scene", "s.zarr", "--out", "o",
               "--tile-px", "8"],
    )  # fmt: skip
    problem = "options.tile_px: input should be greater than or equal to 32 (got 8)"
    assert in_file.exit_code == as_flag.exit_code == 2
    assert in_file.output == f"relaymap: SettingsError: {path}: {problem}\n"
    assert as_flag.output == f"relaymap: SettingsError: invalid settings: {problem}\n"


def test_usage_bbox_is_w_s_e_n_everywhere_and_four_numbers_still_work():
    from relaymap.flows.cli import _bbox_as_one

    assert _bbox_as_one(["search", "u", "--bbox", "15", "43.3", "15.2", "43.4", "--json"]) == [
        "search", "u", "--bbox", "15,43.3,15.2,43.4", "--json"
    ]  # fmt: skip
    assert _bbox_as_one(["--bbox", "-10.5", "-5", "2", "3"]) == ["--bbox", "-10.5,-5,2,3"]
    assert _bbox_as_one(["--bbox", "1,2,3,4", "x"]) == ["--bbox", "1,2,3,4", "x"]
    bad = CliRunner().invoke(
        main, ["search", "http://x", "--collection", "c", "--bbox", "1,2"], prog_name="relaymap"
    )
    assert bad.exit_code == 2
    assert bad.output == (
        "relaymap: Invalid value for '--bbox': '1,2': give W,S,E,N in lon/lat, e.g. "
        "15.0,43.3,15.2,43.4 (relaymap search -h for help)\n"
    )


def test_pipeline_rejects_a_bad_config_before_starting(tmp_path):
    path = tmp_path / "aoi.yaml"
    path.write_text(
        "query: {stac_api: http://x, collections: [s2]}\n"
        "work_url: w\nout_url: o\ncatalog_url: c\n"  # neither a model nor training
    )
    result = CliRunner().invoke(main, ["pipeline", str(path)])
    assert result.exit_code == 2
    assert "give exactly one of 'model' (a trained model) or 'train'" in result.output


def test_a_typed_error_is_one_line_and_exit_code_2(tmp_path):
    """As a user sees it: the real console script, a missing scene store."""
    model = tmp_path / "m.safetensors"
    model.write_bytes(b"not a model")
    args = ["relaymap", "infer", "--model", str(model), "--scene", str(tmp_path / "gone.zarr")]
    args += ["--out", str(tmp_path / "maps")]
    run = subprocess.run(args, capture_output=True, text=True)
    assert run.returncode == 2
    assert run.stdout == ""
    assert run.stderr == (
        f"relaymap: ModelError: file://{model} is not a readable safetensors file: "
        "bad header length\n"
    )
    verbose = subprocess.run(["relaymap", "-v", *args[1:]], capture_output=True, text=True)
    assert verbose.returncode == 1 and "Traceback (most recent call last)" in verbose.stderr
    assert not (tmp_path / "maps").exists()
