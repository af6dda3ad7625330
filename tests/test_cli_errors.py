"""User errors of the ``peft-ext`` command: one line, exit code 2, no traceback (``--debug`` shows it)."""

import pytest

from peft_ext import cli
from tests.test_cli import TINY


@pytest.mark.parametrize("argv, names", [
    (["train", str(TINY), "--set", "training.learning_rate=abc"], "training.learning_rate must be float"),
    (["train", str(TINY), "--set", "method.config.r=-3"], "method.config"),
    (["eval", str(TINY), "--adapter", "missing/"], "'missing' is not a folder"),
    (["train", "nope.yaml"], "nope.yaml"),
])
def test_user_errors_are_one_line(argv, names, capsys):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and names in err and "Traceback" not in err
    assert err.startswith(f"peft-ext {argv[0]}: error:")


def test_empty_recipe_is_an_error(tmp_path, capsys):
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert cli.main(["train", str(empty)]) == 2
    assert "is empty" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_debug_shows_the_traceback():
    from peft_ext.recipe import RecipeError

    with pytest.raises(RecipeError, match="training.learning_rate"):
        cli.main(["--debug", "train", str(TINY), "--set", "training.learning_rate=abc"])


def test_unexpected_errors_keep_their_traceback(monkeypatch):
    monkeypatch.setattr(cli, "cmd_methods", lambda args: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        cli.main(["methods"])


def _saved_adapter(folder):
    from peft import get_peft_model

    from conftest import MLP_TARGETS, tiny_mlp
    from peft_ext import DyLoraConfig

    get_peft_model(tiny_mlp(), DyLoraConfig(r=4, target_modules=MLP_TARGETS)).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("damage, names", [
    ("truncate", "adapter_model.safetensors is truncated"),
    ("config", "adapter_config.json is not valid JSON"),
])
def test_broken_adapter_files_are_one_line(tmp_path, capsys, damage, names):
    adapter = _saved_adapter(tmp_path / "adapter")
    if damage == "truncate":
        w = adapter / "adapter_model.safetensors"
        w.write_bytes(w.read_bytes()[: w.stat().st_size - 100])
    else:
        (adapter / "adapter_config.json").write_text('{"peft_type": ')
    for argv in (["eval", str(TINY), "--adapter", str(adapter)],
                 ["export", str(adapter), "--out", str(tmp_path / "o")]):
        assert cli.main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and names in err and "Traceback" not in err, err


def test_bitsandbytes_kernel_probe_warning_is_silenced():
    """bitsandbytes logs a failed optional-kernel download at import on AVX512-BF16 CPUs; only that record is
    dropped."""
    import io
    import logging

    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    logger.addHandler(handler)
    try:
        logger.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please ...", "offline")
        logger.warning("another bitsandbytes warning")
    finally:
        logger.removeHandler(handler)
    assert stream.getvalue() == "another bitsandbytes warning\n"
