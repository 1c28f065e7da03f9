"""Tests for spafit_jax.config.files: YAML composition, dotted overrides, validation, round trip, CLI."""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from spafit_jax.config import files as C
from spafit_jax import methods
from spafit_jax.data import tasks
from spafit_jax.cli import parse_args
from spafit_jax.config.files import Config, load_config, to_dict
from spafit_jax.training.rundir import save_config
from spafit_jax.errors import ConfigError, SpafitError

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "configs"
ALL_YAML = sorted(p for p in CONFIGS.rglob("*.yaml") if "experiments" not in p.parts)  # run configs (test_experiment
# checks the experiment files)


def write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


def error(paths=(), overrides=()) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(paths, overrides)
    msg = str(info.value)
    assert "\n" not in msg, msg
    return msg


# --- defaults and shipped files -------------------------------------------------------------------


def test_defaults_are_the_offline_demo():
    c = Config()
    assert (c.model.name, c.data.task, c.data.max_length) == ("minilm", "bbc_news", 128)
    assert (c.method.name, c.method.n1, c.method.n2) == ("spafit", None, None)
    assert (c.train.epochs, c.train.batch_size, c.train.lr) == (1.0, 32, 3e-3)
    assert c.method.lora_targets == ("query", "value")
    assert load_config() == c


def test_default_yaml_restates_defaults_with_explicit_strata():
    expected = dataclasses.replace(Config(), method=dataclasses.replace(Config().method, n1=2, n2=4))
    assert load_config([CONFIGS / "default.yaml"]) == expected


def test_shipped_files_present():
    names = {p.relative_to(CONFIGS).as_posix() for p in ALL_YAML}
    assert "default.yaml" in names
    assert {f"glue/{t}.yaml" for t in tasks.GLUE_TASKS} <= names
    assert {f"methods/{m}.yaml" for m in methods.METHODS} <= names


@pytest.mark.parametrize("targets,expected", [("qv", ("query", "value")), ("qkv", ("query", "key", "value")),
                                              ("all", methods.LORA_TARGETS)])
def test_target_presets_compose_with_method_files(targets, expected):
    for method in ("spafit", "spafit_lora_only", "lora"):
        c = load_config([CONFIGS / "methods" / f"{method}.yaml", CONFIGS / "methods" / f"targets_{targets}.yaml"])
        assert c.method.lora_targets == expected and c.method.name == method.split("_")[0]
        assert c.method.stratum3_bias is (method != "spafit_lora_only")


@pytest.mark.parametrize("path", ALL_YAML, ids=lambda p: p.relative_to(CONFIGS).as_posix())
def test_every_shipped_yaml_loads_and_starts_with_a_comment(path):
    config = load_config([str(path)])
    assert isinstance(config, Config)
    assert path.read_text().startswith("# ")


@pytest.mark.parametrize("task", tasks.GLUE_TASKS)
def test_glue_files(task):
    c = load_config([CONFIGS / "glue" / f"{task}.yaml"])
    assert (c.model.name, c.data.task, c.data.max_length, c.train.batch_size) == ("bert-large-cased", task, 128, 32)
    assert c.train.epochs == (10.0 if task in ("rte", "mrpc", "stsb", "cola", "wnli") else 3.0)
    assert c.train.eval_every > 0
    raw = yaml.safe_load((CONFIGS / "glue" / f"{task}.yaml").read_text())
    assert "method" not in raw and "lr" not in raw.get("train", {})


METHOD_LRS = [("full", 2e-5), ("bitfit", 1e-3), ("lora", 5e-4), ("spafit", 5e-4), ("head_only", 1e-3)]


@pytest.mark.parametrize("method,lr", METHOD_LRS)
def test_method_files_compose_with_any_task_in_either_order(method, lr):
    m = CONFIGS / "methods" / f"{method}.yaml"
    for task in tasks.GLUE_TASKS:
        t = CONFIGS / "glue" / f"{task}.yaml"
        a, b = load_config([t, m]), load_config([m, t])
        assert a == b
        assert (a.method.name, a.train.lr, a.train.warmup_ratio, a.data.task) == (method, lr, 0.06, task)
    c = load_config([m])
    assert (c.data.task, c.method.name) == ("bbc_news", method)


def test_spafit_method_file_leaves_strata_to_defaults():
    c = load_config([CONFIGS / "methods" / "spafit.yaml"])
    assert (c.method.n1, c.method.n2, c.method.lora_rank, c.method.lora_alpha) == (None, None, 8, 16.0)
    assert c.method.lora_targets == ("query", "value")


# --- composition and overrides -------------------------------------------------------------------


def test_later_files_win_key_by_key(tmp_path):
    a = write(tmp_path, "a.yaml", "train:\n  lr: 1.0e-3\n  seed: 7\nmodel:\n  name: a\n")
    b = write(tmp_path, "b.yaml", "train:\n  lr: 2.0e-3\nmodel:\n")
    c = load_config([a, b])
    assert (c.train.lr, c.train.seed, c.model.name) == (2e-3, 7, "a")
    assert load_config([b, a]).train.lr == 1e-3


def test_mapping_field_replaced_whole_by_a_later_file(tmp_path):
    a = write(tmp_path, "a.yaml", "train:\n  lr_by_label: {head: 1.0e-3, bias: 1.0e-4}\n")
    b = write(tmp_path, "b.yaml", "train:\n  lr_by_label: {lora: 2.0e-4}\n")
    assert load_config([a, b]).train.lr_by_label == {"lora": 2e-4}


def test_empty_file_is_fine(tmp_path):
    assert load_config([write(tmp_path, "e.yaml", "# nothing\n")]) == Config()


def test_overrides_parse_yaml_values(tmp_path):
    c = load_config(overrides=[
        "train.lr=5e-4", "method.n1=8", "method.n2=0.75", "method.lora_targets=[query,key,value]",
        "train.max_steps=100", "train.log_every=5", "data.buckets=[32, 64, 128]", "train.epochs=2",
        "model.name=bert-base-uncased", "train.lr_by_label.head=1e-3", "method.rank_pattern={'layer/1[01]/.*': 16}",
    ])
    assert c.train.lr == 5e-4 and isinstance(c.train.lr, float)
    assert c.method.n1 == 8 and isinstance(c.method.n1, int)
    assert c.method.n2 == 0.75 and isinstance(c.method.n2, float)
    assert c.method.lora_targets == ("query", "key", "value")
    assert (c.train.max_steps, c.train.log_every, c.data.buckets) == (100, 5, (32, 64, 128))
    assert c.train.epochs == 2.0 and isinstance(c.train.epochs, float)
    assert c.model.name == "bert-base-uncased"
    assert c.train.lr_by_label == {"head": 1e-3}
    assert c.method.rank_pattern == {"layer/1[01]/.*": 16}


def test_overrides_win_over_files_and_accept_null(tmp_path):
    a = write(tmp_path, "a.yaml", "train:\n  max_steps: 50\n  lr: 1.0e-3\n")
    c = load_config([a], ["train.max_steps=null", "train.lr=3e-4"])
    assert (c.train.max_steps, c.train.lr) == (None, 3e-4)
    assert load_config([a], ["train.max_steps=None"]).train.max_steps is None


def test_override_list_shorthands():
    assert load_config(overrides=["method.lora_targets=query,key"]).method.lora_targets == ("query", "key")
    assert load_config(overrides=["method.lora_targets=value"]).method.lora_targets == ("value",)


def test_override_sets_one_entry_of_a_mapping(tmp_path):
    a = write(tmp_path, "a.yaml", "train:\n  lr_by_label: {head: 1.0e-3}\n")
    c = load_config([a], ["train.lr_by_label.bias=1e-4"])
    assert c.train.lr_by_label == {"head": 1e-3, "bias": 1e-4}


def test_yaml11_exponent_strings_become_floats(tmp_path):
    # PyYAML reads 5e-4 (no dot) as the string "5e-4"; float fields accept it.
    a = write(tmp_path, "a.yaml", "train:\n  lr: 5e-4\n  lr_by_label: {head: 1e-3}\nmethod:\n  lora_dropout: 1e-1\n")
    assert yaml.safe_load(Path(a).read_text())["train"]["lr"] == "5e-4"
    c = load_config([a])
    assert (c.train.lr, c.train.lr_by_label["head"], c.method.lora_dropout) == (5e-4, 1e-3, 0.1)


def test_ints_are_fine_for_float_fields(tmp_path):
    c = load_config([write(tmp_path, "a.yaml", "train:\n  epochs: 3\n  warmup_ratio: 0\nmethod:\n  lora_alpha: 32\n")])
    assert (c.train.epochs, c.train.warmup_ratio, c.method.lora_alpha) == (3.0, 0.0, 32.0)
    assert all(isinstance(v, float) for v in (c.train.epochs, c.train.warmup_ratio, c.method.lora_alpha))


def test_mixed_kinds_of_strata_are_not_compared():
    c = load_config(overrides=["method.n1=5", "method.n2=0.5"])
    assert (c.method.n1, c.method.n2) == (5, 0.5)
    assert load_config(overrides=["method.n1=4", "method.n2=4"]).method.n1 == 4


def test_local_task_needs_both_files():
    assert "data.train_file" in error(overrides=["data.task=local"])
    assert "data.eval_file" in error(overrides=["data.task=local", "data.train_file=train.csv"])
    c = load_config(overrides=["data.task=local", "data.train_file=train.csv", "data.eval_file=dev.csv",
                               "data.text_pair_column=b"])
    assert (c.data.train_file, c.data.text_pair_column) == ("train.csv", "b")


# --- errors ---------------------------------------------------------------------------------------

ERRORS = [
    # unknown sections / keys, with the closest suggestion
    (["trian.lr=1e-3"], ["trian", "did you mean 'train'"]),
    (["train.learning_rate=1e-3"], ["train.learning_rate", "did you mean 'train.lr'"]),
    (["method.lr=1e-3"], ["method.lr", "did you mean 'train.lr'"]),
    (["method.n3=4"], ["method.n3", "did you mean 'method.n2'"]),
    (["train.num_train_epochs=4"], ["did you mean 'train.epochs'"]),
    (["train.lr.head=1"], ["train.lr", "not a mapping"]),
    (["train.lr"], ["train.lr", "no '='"]),
    (["configs/glue/sst2.yaml"], ["--config configs/glue/sst2.yaml"]),
    (["lr=1e-3"], ["section.key", "train.lr"]),
    # wrong types
    (["train.batch_size=abc"], ["train.batch_size", "an integer", "'abc'"]),
    (["train.batch_size=32.0"], ["train.batch_size", "an integer"]),
    (["train.seed=true"], ["train.seed", "an integer", "True"]),
    (["train.lr=fast"], ["train.lr", "a number"]),
    (["train.lr=nan"], ["train.lr", "a number"]),
    (["train.lr=true"], ["train.lr", "a number"]),
    (["method.rslora=1"], ["method.rslora", "a boolean"]),
    (["data.text_column=no"], ["data.text_column", "a string", "quote it"]),
    (["data.train_file=yes"], ["data.train_file", "a string or null", "quote it"]),
    (["method.lora_targets=[1, 2]"], ["method.lora_targets", "a list of strings"]),
    (["train.lr_by_label=[1]"], ["train.lr_by_label", "mapping"]),
    (["method.n1=abc"], ["method.n1", "an integer or a number or null"]),
    (["train.lr=null"], ["train.lr", "a number"]),
    # impossible values
    (["train.batch_size=0"], ["train.batch_size", "> 0"]),
    (["train.batch_size=-4"], ["train.batch_size", "> 0"]),
    (["train.lr=0"], ["train.lr", "> 0"]),
    (["train.lr=-1e-3"], ["train.lr", "> 0"]),
    (["train.grad_accum=0"], ["train.grad_accum", ">= 1"]),
    (["train.epochs=0"], ["train.epochs", "> 0"]),
    (["data.max_length=4"], ["data.max_length", ">= 8"]),
    (["method.name=lorax"], ["method.name", "did you mean 'lora'"]),
    (["method.name=adapter"], ["method.name", "full | bitfit | lora | spafit | head_only"]),
    (["data.padding=longest"], ["data.padding", "bucket | max_length"]),
    (["model.dtype=float16"], ["model.dtype", "float32 | bfloat16"]),
    (["model.param_dtype=fp32"], ["model.param_dtype"]),
    (["parallel.mode=dp"], ["parallel.mode", "mesh | pmap"]),
    (["parallel.mode=pmap", "parallel.fsdp=2"], ["parallel.fsdp", "mesh"]),
    (["method.n1=5", "method.n2=3"], ["method.n1", "method.n2=3"]),
    (["method.n1=0.8", "method.n2=0.5"], ["method.n1", "method.n2=0.5"]),
    (["method.n1=-1"], ["method.n1", "negative"]),
    (["method.n2=-0.5"], ["method.n2", "negative"]),
    (["method.n1=1.5"], ["method.n1", "fraction", "> 1"]),
    (["method.lora_rank=0"], ["method.lora_rank", "> 0"]),
    (["method.lora_dropout=1.0"], ["method.lora_dropout", "[0, 1)"]),
    (["method.lora_dropout=-0.1"], ["method.lora_dropout", "[0, 1)"]),
    (["method.lora_targets=[]"], ["method.lora_targets", "empty"]),
    (["train.eval_every=-1"], ["train.eval_every", ">= 0"]),
    (["checkpoint.keep=0"], ["checkpoint.keep", ">= 1"]),
    (["checkpoint.every=-5"], ["checkpoint.every", ">= 0"]),
    (["train.log_every=0"], ["train.log_every", ">= 1"]),
    (["train.warmup_ratio=1.5"], ["train.warmup_ratio", "[0, 1]"]),
    (["train.lr_by_label.frozen=1e-3"], ["train.lr_by_label", "frozen"]),
    (["train.lr_by_label.haed=1e-3"], ["train.lr_by_label", "did you mean 'head'"]),
    (["data.task=sst-2"], ["data.task", "did you mean 'sst2'"]),
    (["data.buckets=[64, 32]"], ["data.buckets", "increasing"]),
    (["data.buckets=[32, 256]"], ["data.buckets", "data.max_length"]),
    (["data.is_regression=true", "data.num_labels=3"], ["data.num_labels", "regression"]),
    (["distributed.num_processes=2", "distributed.process_id=2"], ["distributed.process_id"]),
]


@pytest.mark.parametrize("overrides,needles", ERRORS, ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_bad_overrides_raise_config_error(overrides, needles):
    msg = error(overrides=overrides)
    for needle in needles:
        assert needle in msg, (needle, msg)
    assert "override" in msg  # says where the bad value came from


def test_errors_name_the_file(tmp_path):
    a = write(tmp_path, "bad.yaml", "train:\n  batch_size: 0\n")
    msg = error([a])
    assert "train.batch_size" in msg and "bad.yaml" in msg


def test_unknown_section_and_top_level_field_in_a_file(tmp_path):
    assert "did you mean 'train'" in error([write(tmp_path, "a.yaml", "training:\n  lr: 1.0e-3\n")])
    assert "did you mean 'train.seed'" in error([write(tmp_path, "b.yaml", "seed: 3\n")])
    assert "did you mean 'train.batch_size'" in error([write(tmp_path, "c.yaml", "train:\n  batchsize: 3\n")])


def test_malformed_files(tmp_path):
    assert "bad.yaml:" in error([write(tmp_path, "bad.yaml", "train:\n  lr: [1, 2\n")])
    assert "duplicate key 'lr'" in error([write(tmp_path, "dup.yaml", "train:\n  lr: 1.0\n  lr: 2.0\n")])
    assert "mapping of sections" in error([write(tmp_path, "list.yaml", "- a\n- b\n")])
    assert "must be a mapping" in error([write(tmp_path, "sec.yaml", "train: 3\n")])


def test_missing_config_file(tmp_path):
    msg = error([str(tmp_path / "nope.yaml")])
    assert "nope.yaml" in msg and "not found" in msg
    write(tmp_path, "sst2.yaml", "")
    assert "did you mean --config" in error([str(tmp_path / "sst.yaml")])
    assert "directory" in error([str(tmp_path)])


def test_config_error_is_a_spafit_error():
    with pytest.raises(SpafitError):
        load_config(overrides=["train.lr=0"])


# --- round trip -----------------------------------------------------------------------------------

ROUND_TRIPS = [
    ([], []),
    (["default.yaml"], []),
    (["glue/mnli.yaml", "methods/spafit.yaml"], ["method.n1=8", "method.n2=16"]),
    (["glue/stsb.yaml", "methods/lora.yaml"], ["method.lora_targets=[query,key,value]", "train.lr_by_label.head=1e-3",
                                               "data.buckets=[16,32,128]", "data.eval_splits=[validation]",
                                               "method.rank_pattern={'a.*b': 4}", "method.n1=0.25"]),
    ([], ["data.task=local", "data.train_file='yes'", "data.eval_file=dev.csv", "data.label_column='null'", "train.max_grad_norm=null",
          "distributed.coordinator_address=10.0.0.1:1234", "train.best_metric=f1"]),
]


@pytest.mark.parametrize("files,overrides", ROUND_TRIPS)
def test_save_and_reload_is_identical(tmp_path, files, overrides):
    config = load_config([CONFIGS / f for f in files], overrides)
    path = tmp_path / "run" / "config.yaml"
    save_config(config, path)
    assert load_config([str(path)]) == config
    text = path.read_text()
    assert text.startswith("#")
    raw = yaml.safe_load(text)
    assert raw == to_dict(config)
    assert list(raw) == list(C.SECTIONS)  # every section, every field, resolved
    for section, cls in C.SECTIONS.items():
        assert list(raw[section]) == [f.name for f in dataclasses.fields(cls)]


def test_to_dict_is_json_safe():
    d = to_dict(load_config(overrides=["train.lr_by_label.head=1e-3"]))
    assert json.loads(json.dumps(d)) == d
    assert d["method"]["lora_targets"] == ["query", "value"]


def test_config_from_dict_and_frozen():
    c = C.config_from_dict({"train": {"lr": "2e-5"}, "method": {"name": "full"}})
    assert (c.train.lr, c.method.name) == (2e-5, "full")
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.train.lr = 1.0  # type: ignore[misc]
    with pytest.raises(ConfigError):
        C.config_from_dict({"train": {"bogus": 1}})


# --- CLI ------------------------------------------------------------------------------------------


def test_help_exits_zero_and_documents_everything(capsys):
    with pytest.raises(SystemExit) as info:
        parse_args(["--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    assert "configs/" in text and "SPAFIT" in text
    for option in ("--config", "--workdir", "--overwrite", "train.max_steps=100 train.log_every=5",
                   "--config configs/glue/sst2.yaml --config configs/methods/spafit.yaml"):
        assert option in text
    for section, cls in C.SECTIONS.items():
        assert f"  {section}:" in text
        for f in dataclasses.fields(cls):
            assert f"{section}.{f.name} = " in text


def test_parse_args_defaults():
    config, args = parse_args([])
    assert config == Config()
    assert (args.workdir, args.overwrite, args.config, args.overrides) == (None, False, [], [])


def test_parse_args_composes_and_intermixes():
    config, args = parse_args([
        "--config", str(CONFIGS / "glue" / "rte.yaml"), "train.max_steps=100",
        "--config", str(CONFIGS / "methods" / "bitfit.yaml"), "--workdir", "runs/x", "train.log_every=5", "--overwrite",
    ])
    assert (config.data.task, config.method.name, config.train.lr) == ("rte", "bitfit", 1e-3)
    assert (config.train.max_steps, config.train.log_every) == (100, 5)
    assert (args.workdir, args.overwrite) == ("runs/x", True)


def test_parse_args_raises_config_error():
    with pytest.raises(ConfigError, match="train.lr"):
        parse_args(["train.lr=-1"])
    with pytest.raises(ConfigError, match="not found"):
        parse_args(["--config", "does/not/exist.yaml"])


def test_print_config(capsys):
    with pytest.raises(SystemExit) as info:
        parse_args(["--print-config", "method.name=lora"])
    assert info.value.code == 0
    assert C.config_from_dict(yaml.safe_load(capsys.readouterr().out)).method.name == "lora"


def test_import_is_light():
    code = ("import sys, spafit_jax.config.files; "
            "heavy = [m for m in ('jax', 'flax', 'transformers', 'torch', 'datasets', 'numpy') if m in sys.modules]; "
            "assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


def test_check_max_length_refuses_more_tokens_than_the_model_has_positions():
    """The one max_length check (the trainer's loading and aot's setup call it): one line naming the fix."""
    import types

    from spafit_jax.errors import ConfigError
    from spafit_jax.training.loading import check_max_length

    model = types.SimpleNamespace(max_tokens=512)
    cfg = load_config([], ["data.max_length=512", "model.name=bert-x"])
    check_max_length(cfg, model)  # exactly the positions: fine
    cfg = load_config([], ["data.max_length=513", "model.name=bert-x"])
    with pytest.raises(ConfigError, match=r"data.max_length=513 is above the 512 positions of bert-x; "
                                          r"use data.max_length=512 or less") as e:
        check_max_length(cfg, model)
    assert e.value.field == "data.max_length" and "\n" not in str(e.value)
    with pytest.raises(ConfigError, match=r"\(from max_position_embeddings in m/config.json\)"):
        check_max_length(cfg, model, "m/config.json")


def test_parse_yaml_refuses_a_key_given_twice_as_the_caller_asks():
    """Every YAML file the commands read goes through config.parse_yaml: a duplicate key is one line, as `error`."""
    from spafit_jax.config.files import parse_yaml
    from spafit_jax.errors import ConfigError

    assert parse_yaml("a: 1\nb: {c: 2}\n", "x.yaml") == {"a": 1, "b": {"c": 2}}

    class Mine(ConfigError):
        pass

    with pytest.raises(Mine, match=r"^x.yaml:3: duplicate key 'a': the key 'a' appears twice in one mapping "
                                   r"\(first on line 1\)"):
        parse_yaml("a: 1\nb: 2\na: 3\n", "x.yaml", Mine)
