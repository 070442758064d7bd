"""Config loading: YAML + dotted overrides, clear errors naming the key and what is allowed."""

from __future__ import annotations

from pathlib import Path

import pytest

from mlic.cli import main, resolve_config_path
from mlic.config import load_config, save_config
from mlic.errors import ConfigError


def test_yaml_then_overrides(tmp_path: Path) -> None:
    y = tmp_path / "c.yaml"
    y.write_text("train:\n  epochs: 7\nmodel:\n  name: baseline\n  kwargs:\n    drop_rate: 0.1\n")
    cfg = load_config(y, ["train.epochs=3", "optim.lr=0.5", "data.image_size=96"])
    assert cfg.train.epochs == 3 and cfg.optim.lr == 0.5 and cfg.data.image_size == 96
    assert cfg.model.kwargs == {"drop_rate": 0.1}
    save_config(cfg, tmp_path / "resolved.yaml")
    assert load_config(tmp_path / "resolved.yaml") == cfg


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("data.bogus=1", r"unknown config key 'data.bogus'; allowed keys here: \[.*'batch_size'"),
        ("nope.x=1", r"unknown config key 'nope'; allowed keys here: \['data', 'loss'"),
        ("train.epochs=abc", r"bad value for 'train.epochs'"),
        (
            "loss.name=hinge",
            r"loss.name='hinge' is not allowed; choose one of \['bce', 'asl', 'focal'\]",
        ),
        ("data.batch_size=0", r"data.batch_size=0 must be > 0"),
        ("epochs", r"must look like key=value"),
    ],
)
def test_bad_overrides_name_the_key(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_bad_key_in_yaml_names_file(tmp_path: Path) -> None:
    y = tmp_path / "c.yaml"
    y.write_text("optim:\n  learning_rate: 0.1\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: unknown config key 'optim.learning_rate'"):
        load_config(y)


def test_shipped_recipes_load() -> None:
    cfg = load_config(resolve_config_path("demo"))
    assert cfg.model.backbone == "tf_efficientnet_lite0" and cfg.data.format == "demo"


def test_cli_reports_bad_key_on_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["train", "demo", "train.epochz=3"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1
    assert "unknown config key 'train.epochz'" in err


def test_cli_missing_dataset_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(
        ["train", "demo", "data.format=voc", f"data.root={tmp_path / 'VOC2007'}", "train.epochs=1"]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert f"{tmp_path / 'VOC2007'}: VOC folder not found" in err


def test_every_model_has_its_recipes() -> None:
    from importlib import resources

    import mlic

    shipped = {p.name for p in (resources.files("mlic") / "configs").iterdir()}
    for name in mlic.list_models():
        for dataset in ("voc2007", "coco2014", "demo"):
            recipe = f"{name}_{dataset}"
            assert f"{recipe}.yaml" in shipped, recipe
            cfg = load_config(resolve_config_path(recipe))
            assert cfg.model.name == name
            if dataset == "demo":
                assert cfg.model.backbone == "tf_efficientnet_lite0" and cfg.model.pretrained
                assert (cfg.train.epochs, cfg.train.seed, cfg.data.image_size) == (6, 0, 192)
            else:
                # the papers' torchvision weights; SSGRL trains at 576 px (paper)
                assert cfg.model.backbone == "resnet101.tv_in1k"
                assert cfg.data.image_size == (576 if name == "ssgrl" else 448)
                assert cfg.data.format == {"voc2007": "voc", "coco2014": "coco"}[dataset]


def test_tests_do_not_see_the_folder_pytest_started_in(tmp_path: Path) -> None:
    """`mlic demo` then `pytest` in one checkout: the demo's runs/ and data/ are not seen."""
    repo = Path(__file__).resolve().parents[1]
    assert Path.cwd() != repo and not any(Path.cwd().iterdir())
    assert main(["train", "demo", "data.format=voc", f"data.root={tmp_path}/none"]) == 2
    assert not Path("runs").exists()  # the default run.output_dir is the test's own folder


@pytest.mark.parametrize(
    ("override", "suggestion"),
    [
        ("train.epoch=3", "'train.epochs'"),
        ("trian.epochs=2", "'train'"),
        ("data.imagesize=64", "'data.image_size'"),
    ],
)
def test_a_misspelt_key_gets_a_did_you_mean(override: str, suggestion: str) -> None:
    with pytest.raises(ConfigError, match=f"did you mean {suggestion}"):
        load_config(None, [override])


def test_an_unrelated_key_gets_no_guess() -> None:
    with pytest.raises(ConfigError) as e:
        load_config(None, ["optim.learning_rate=1"])
    assert "did you mean" not in str(e.value) and "allowed keys here" in str(e.value)
