"""Issue 32: reproduction a researcher can check.

SSGRL's resize-then-crop protocol, weight decay on every parameter, model selection on a
held-out part of train, the gpu_decode refusal, mgsgn's ablation switches, aamn's memory
under EMA, and the papers' figures: one registry entry per model, ``mlic models --paper``,
and the paper's row beside a run's in ``mlic eval``'s report and the Hub card.
"""

from __future__ import annotations

import csv
import json
import re
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file
from torchvision.transforms import v2

import mlic
from conftest import TINY_BACKBONE, make_voc
from mlic.cli import main, resolve_config_path
from mlic.config import load_config, to_dict
from mlic.data.transforms import RandomSquareCrop, build_transform, config_transforms
from mlic.engine.trainer import build_ema, build_optimizer, train
from mlic.errors import ConfigError
from mlic.models._comparison import dataset_of, paper_comparison
from mlic.models._papers import DATASETS, PaperResult
from mlic.models._registry import list_models, published_results, register_model

C = 5
NAMES = ["cat", "dog", "car", "person", "tree"]


def tiny(name: str, **kw) -> torch.nn.Module:
    from test_models import tiny_labels

    torch.manual_seed(0)
    return mlic.create_model(name, C, labels=tiny_labels(), backbone=TINY_BACKBONE, **kw)


def n_params(module: torch.nn.Module | None) -> int:
    return 0 if module is None else sum(p.numel() for p in module.parameters())


# ----------------------------------------------------------------------------- 1. SSGRL protocol
def test_square_crop_takes_scaled_squares_of_the_warp() -> None:
    crop = RandomSquareCrop(64, resize=80, scales=(1.0, 0.9, 0.8, 0.6, 0.5))
    assert crop.sides == [80, 72, 64, 48, 40]
    seen = set()
    torch.manual_seed(0)
    for _ in range(500):
        top, left, side = crop.crop_box()
        assert side in crop.sides and 0 <= top <= 80 - side and 0 <= left <= 80 - side
        seen.add(side)
    assert seen == set(crop.sides)  # every scale is drawn


def test_ssgrl_protocol_shapes_train_and_eval() -> None:
    img = torch.randint(0, 256, (3, 90, 120), dtype=torch.uint8)  # not square: warped
    train_tf = build_transform(
        64,
        (0.5,) * 3,
        (0.5,) * 3,
        True,
        randaugment=False,
        hflip=False,
        normalize=False,
        crop="square",
        crop_scales=(1.0, 0.5),
        resize=80,
    )
    assert any(isinstance(t, RandomSquareCrop) for t in train_tf.transforms)
    torch.manual_seed(1)
    a = train_tf(img)
    torch.manual_seed(1)
    assert a.shape == (3, 64, 64) and a.dtype == torch.uint8 and torch.equal(a, train_tf(img))
    eval_tf = build_transform(64, (0.5,) * 3, (0.5,) * 3, False, normalize=False, resize=80)
    out = eval_tf(img)
    warped = v2.functional.resize(img, [80, 80], antialias=True)
    assert out.shape == (3, 64, 64)
    assert torch.equal(out, v2.functional.center_crop(warped, [64, 64]))  # centre of the warp
    plain = build_transform(64, (0.5,) * 3, (0.5,) * 3, False, normalize=False)(img)
    assert not torch.equal(out, plain)  # not the whole image resized


def test_protocol_keys_from_the_config() -> None:
    cfg = load_config(None, ["data.crop=square", "data.resize=80", "data.image_size=64"])
    train_tf, eval_tf = config_transforms(cfg.data, 64, (0.5,) * 3, (0.5,) * 3)
    assert any(isinstance(t, RandomSquareCrop) for t in train_tf.transforms)
    assert any(isinstance(t, v2.CenterCrop) for t in eval_tf.transforms)
    img = torch.randint(0, 256, (3, 50, 70), dtype=torch.uint8)
    assert train_tf(img).shape == eval_tf(img).shape == (3, 64, 64)
    with pytest.raises(ConfigError, match="data.crop=square .*data.resize"):
        load_config(None, ["data.crop=square"])
    with pytest.raises(ConfigError, match="data.resize=48 is smaller than data.image_size=64"):
        load_config(None, ["data.resize=48", "data.image_size=64"])
    with pytest.raises(ConfigError, match="data.resize=48"):  # the model's default size
        config_transforms(load_config(None, ["data.resize=48"]).data, 64, (0.5,) * 3, (0.5,) * 3)


# ----------------------------------------------------------------------------- 2. weight decay
def _decay_of(opt: torch.optim.Optimizer) -> dict[int, float]:
    return {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_decay_norm_and_bias_groups(optimizer: str) -> None:
    model = tiny("mlgcn")
    names = dict(model.named_parameters())
    one_d = {id(p) for n, p in names.items() if p.ndim <= 1 or n.endswith(".bias")}
    assert one_d and len(one_d) < len(names)
    groups = {}
    for flag in (False, True):
        over = [f"optim.name={optimizer}", "optim.weight_decay=0.001"]
        cfg = load_config(None, over + [f"optim.decay_norm_and_bias={flag}"])
        groups[flag] = _decay_of(build_optimizer(model, cfg, torch.device("cpu")))
        assert set(groups[flag]) == {id(p) for p in names.values()}  # every parameter once
    # default: today's behaviour, no decay on biases and 1-D parameters (norms)
    assert all(groups[False][i] == (0.0 if i in one_d else 0.001) for i in groups[False])
    assert all(d == 0.001 for d in groups[True].values())  # ML-GCN's SGD, Q2L's AdamW
    assert load_config(None).optim.decay_norm_and_bias is False


def _recipes() -> list[str]:
    root = resources.files("mlic") / "configs"
    return sorted(p.name[:-5] for p in root.iterdir() if p.name.endswith(".yaml"))


def _header(name: str) -> str:
    text = resolve_config_path(name).read_text()
    return "\n".join(line for line in text.splitlines() if line.startswith("#"))


def test_paper_recipes_name_decay_selection_and_difficult_labels() -> None:
    papers = [n for n in _recipes() if "demo" not in n and n != "demo"]
    assert len(papers) >= 20
    for name in papers:
        cfg, head = load_config(resolve_config_path(name)), _header(name)
        family = "attn_gcn" if name.startswith("attn_gcn") else name.split("_")[0]
        decays_all = family in ("mlgcn", "attn_gcn", "mgsgn", "q2l")
        assert cfg.optim.decay_norm_and_bias is decays_all, name
        assert "decay_norm_and_bias" in head or family == "ssgrl", name  # ssgrl: decay 0
        assert cfg.train.select_on == "val" and "train.select_on=holdout" in head, name
        assert f"mlic models --paper {family}" in head, name
        # the figures live in the registry entry only
        assert not re.search(r"mAP[ ~:]*\d", head), name
        if family in ("mlgcn", "attn_gcn", "mgsgn") and "voc" in name:
            assert "difficult" in head and "positives" in head, name
    stale = _header("msformer_coco2014_576")
    assert "576 px" in stale and "36x36" in stale and "28x28" not in stale
    assert "93.4" not in _header("ssgrl_voc2012")


# ----------------------------------------------------------------------------- 3. selection
def _objects(rng: np.random.Generator, n: int) -> list[list[tuple[str, int]]]:
    out = []
    for _ in range(n):
        k = int(rng.integers(1, 3))
        out.append([(str(x), 0) for x in rng.choice(NAMES, size=k, replace=False)])
    return out


def _voc(root: Path, val_seed: int) -> Path:
    rng = np.random.default_rng(0)
    trainval = _objects(rng, 24)
    test = _objects(np.random.default_rng(val_seed), 10)
    return make_voc(root, {"trainval": trainval, "test": test}, labels_txt=NAMES)


def _run(voc: Path, out: Path, name: str, *over: str) -> dict:
    base = {
        "data.format": "voc",
        "data.root": str(voc),
        "data.train": "trainval",
        "data.val": "test",
        "data.image_size": "32",
        "data.batch_size": "8",
        "data.workers": "0",
        "data.randaugment": "false",
        "data.calibration_fraction": "0.3",
        "model.name": "baseline",
        "model.backbone": TINY_BACKBONE,
        "model.pretrained": "false",
        "train.epochs": "3",
        "train.ema_decay": "0.5",
        "optim.lr": "0.01",
        "run.output_dir": str(out),
        "run.name": name,
        "run.progress": "false",
        "run.tensorboard": "false",
    }
    cfg = load_config(None, [f"{k}={v}" for k, v in base.items()] + list(over))
    return train(cfg)


@pytest.fixture(scope="module")
def holdout_runs(tmp_path_factory) -> tuple[dict, dict]:
    """Two runs with the same training data and seed whose val splits differ in labels."""
    tmp = tmp_path_factory.mktemp("select")
    a = _run(_voc(tmp / "a", 1), tmp / "out", "a", "train.select_on=holdout")
    b = _run(_voc(tmp / "b", 2), tmp / "out", "b", "train.select_on=holdout")
    return a, b


def test_select_on_holdout_never_uses_val(holdout_runs) -> None:
    a, b = holdout_runs
    val_a = [r["mAP"] for r in a["history"]]
    val_b = [r["mAP"] for r in b["history"]]
    assert val_a != val_b  # the val splits differ ...
    for key in ("holdout_mAP", "ema_holdout_mAP"):  # ... the held-out training images do not
        assert [r[key] for r in a["history"]] == [r[key] for r in b["history"]]
    assert a["best_epoch"] == b["best_epoch"]
    wa = load_file(str(a["run_dir"] / "best.safetensors"))
    wb = load_file(str(b["run_dir"] / "best.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    # the kept epoch is the best on the held-out images (raw or EMA), whatever val says
    scores = [max(r["holdout_mAP"], r["ema_holdout_mAP"]) for r in a["history"]]
    assert a["best_epoch"] == 1 + int(np.argmax(scores))
    meta = mlic.engine.checkpoint.read_metadata(a["run_dir"] / "best.safetensors")
    assert meta["selected_on"] == "holdout"
    with (a["run_dir"] / "metrics.csv").open() as f:
        assert "holdout_mAP" in next(csv.reader(f))


def test_select_on_holdout_needs_the_holdout() -> None:
    with pytest.raises(ConfigError, match="train.select_on=holdout.*data.calibration=val"):
        load_config(None, ["train.select_on=holdout", "data.calibration=val"])
    with pytest.raises(ConfigError, match="train.select_on"):
        load_config(None, ["train.select_on=test"])
    assert load_config(None).train.select_on == "val"


# ----------------------------------------------------------------------------- 7. gpu_decode
@pytest.mark.parametrize(
    ("over", "keys"),
    [
        (["data.crop=multiscale"], ("data.gpu_decode", "data.crop=multiscale")),
        (["data.crop=square", "data.resize=640"], ("data.gpu_decode", "data.crop=square")),
        (["data.resize=640"], ("data.gpu_decode", "data.resize=640")),
    ],
)
def test_gpu_decode_refuses_what_it_cannot_crop(over: list[str], keys: tuple[str, str]) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, ["data.gpu_decode=true", *over])
    assert all(k in str(err.value) for k in keys)
    load_config(None, ["data.gpu_decode=true"])  # a plain resize is what it does


def test_gpu_decode_refusal_is_one_cli_line(capsys) -> None:
    code = main(["train", "demo", "data.gpu_decode=true", "data.crop=multiscale"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert err[0].startswith("mlic: error: ") and "data.gpu_decode" in err[0]


# ----------------------------------------------------------------------------- 5. mgsgn switches
def _copy_shared(ablated: torch.nn.Module, full: torch.nn.Module) -> None:
    """Give ``ablated`` every weight of ``full`` it has (same name and shape); the deepest
    level's projection keeps its weights when the cross-layer module goes."""
    own = full.state_dict()
    if "cross_layer.score.weight" not in ablated.state_dict():
        last = len(full.cross_layer.proj) - 1
        own = {
            k.replace(f"cross_layer.proj.{last}.", "cross_layer.proj."): v for k, v in own.items()
        }
    state = ablated.state_dict()
    shared = {k: v for k, v in own.items() if k in state and state[k].shape == v.shape}
    missing = set(state) - set(shared)
    assert not missing, f"the ablation adds parameters: {sorted(missing)}"
    ablated.load_state_dict(shared)


@pytest.mark.parametrize(
    ("kwargs", "removed"),
    [
        ({"dual_branch": "none"}, lambda m: n_params(m.dual_branch)),
        (
            {"cross_layer": False},
            lambda m: n_params(m.cross_layer) - n_params(m.cross_layer.proj[-1]),
        ),
        ({"dynamic_graph": False}, lambda m: n_params(m.dynamic_graph) + 1),  # + the mix
        ({"static_graph": False}, lambda m: 1),  # a buffer and the mix scalar
        (
            {"dynamic_graph": False, "static_graph": False},
            lambda m: n_params(m.dynamic_graph) + 1 + n_params(m.gcn),
        ),
    ],
)
def test_mgsgn_switch_removes_exactly_its_module(kwargs: dict, removed) -> None:
    full, ablated = tiny("mgsgn").eval(), tiny("mgsgn", **kwargs).eval()
    assert n_params(full) - n_params(ablated) == removed(full) > 0
    _copy_shared(ablated, full)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out_full, out_ablated = full(x), ablated(x)
    assert out_ablated.shape == (2, C) and torch.isfinite(out_ablated).all()
    assert (out_full - out_ablated).abs().max() > 1e-5  # the module did something
    if kwargs.get("static_graph") is False:
        assert "static_adjacency" not in ablated.state_dict()
    if kwargs.get("cross_layer") is False:
        assert len(ablated.backbone.channels) == 1  # only the deepest level is taken


# ----------------------------------------------------------------------------- 6. aamn under EMA
def _step(model, ema, step: int, present: list[int]) -> None:
    x = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(step))
    targets = torch.zeros(4, C)
    targets[:, present] = 1.0
    with torch.no_grad():
        model(x)
    model.on_train_batch_end(targets)
    ema.update(model, step=step)


def test_aamn_ema_memory_is_right_for_a_class_first_seen_later() -> None:
    model = tiny("aamn").train()
    cfg = load_config(None, ["train.ema_decay=0.9", "train.ema_warmup=false"])
    ema = build_ema(model, cfg)
    for step in range(4):  # class 0 only
        _step(model, ema, step, [0])
    assert model.memory.initialized[3] == 0 and ema.module.memory.initialized[3] == 0
    _step(model, ema, 4, [0, 3])  # class 3 first seen now
    live = model.memory.memory[3].clone()
    d = ema.get_decay(4)
    assert 0 < d < 1
    mem = ema.module.memory
    # the EMA averaged memory and weight alike: the raw memory is only (1 - d) of the prototype
    torch.testing.assert_close(mem.memory[3], (1 - d) * live)
    assert float(mem.initialized[3]) == pytest.approx(1 - d)
    torch.testing.assert_close(mem.prototypes()[3], live)  # ... the prototype it reads is right
    _step(model, ema, 5, [3])
    d5 = ema.get_decay(5)
    expected = (d5 * (1 - d) * live + (1 - d5) * model.memory.memory[3]) / (d5 * (1 - d) + 1 - d5)
    torch.testing.assert_close(mem.prototypes()[3], expected)  # weighted mean since first seen
    # the EMA copy reads exactly what a model holding those prototypes reads
    ref = tiny("aamn").eval()
    ref.load_state_dict(ema.module.state_dict())
    with torch.no_grad():
        ref.memory.memory.copy_(mem.prototypes())
        ref.memory.initialized.copy_((mem.initialized > 0).float())
        x = torch.randn(2, 3, 64, 64)
        torch.testing.assert_close(ema.module.eval()(x), ref(x))


def test_aamn_reads_checkpoints_with_a_boolean_mask(tmp_path: Path) -> None:
    model = tiny("aamn").eval()
    with torch.no_grad():
        model.memory.memory[1] = 2.0
        model.memory.initialized[1] = 1.0
    state = model.state_dict()
    state["memory.initialized"] = state["memory.initialized"] > 0  # the old file format
    loaded = tiny("aamn").eval()
    loaded.load_state_dict(state)
    assert loaded.memory.initialized.dtype == torch.float32
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))


# ----------------------------------------------------------------------------- 8-9. the papers
def _paper_dicts(model: torch.nn.Module) -> list[dict]:
    found, todo = [], [model.default_cfg["paper"]]
    while todo:
        d = todo.pop()
        found.append(d)
        todo += [v for v in d.values() if isinstance(v, dict)]
    return found


def test_the_registry_is_the_one_place_for_published_figures() -> None:
    for name in list_models():
        for row in published_results(name):
            assert row.dataset in DATASETS and row.source, name
            for v in (row.mAP, row.CF1, row.OF1, row.params_m):
                assert v is None or 0 < v <= 100
        # default_cfg["paper"] keeps training settings, no figure
        for d in _paper_dicts(tiny(name)):
            assert not [k for k in d if "map" in k.lower()], name
    ms = {(r.dataset, r.input_size): r for r in published_results("msformer")}
    assert ms[("coco2014", 448)].mAP == 85.15 and ms[("coco2014", 448)].params_m == 69.5
    assert "seed 003" in ms[("coco2014", 448)].source
    assert ms[("coco2014", 576)].mAP is None  # a table image: unknown, not invented
    assert tiny("msformer").default_cfg["paper"]["params_m"] == 69.5  # derived from the entry
    ssgrl = {r.dataset: r for r in published_results("ssgrl")}
    assert ssgrl["voc2012"].mAP != ssgrl["voc2007"].mAP  # the stale anchor
    assert {r.dataset for r in published_results("mlgcn")} == {"coco2014", "voc2007"}
    assert all(r.mAP is None for r in published_results("aamn"))  # an abstract without figures
    with pytest.raises(ValueError, match="source"):
        PaperResult("voc2007", 90.0, "")
    with pytest.raises(TypeError, match="PaperResult"):

        @register_model(published=({"mAP": 1},))  # type: ignore[arg-type]
        def not_a_row(num_classes: int, labels=None): ...  # noqa: ANN001


def test_models_paper_lists_every_model(capsys, tmp_path: Path) -> None:
    assert main(["models", "--paper", "--json", str(tmp_path / "p.json")]) == 0
    out = capsys.readouterr().out
    for name in list_models():
        assert re.search(rf"^{name}\s", out, re.M), name
    assert "83.80" in out and "HCPLab-SYSU" in out  # SSGRL on COCO and its source
    rows = json.loads((tmp_path / "p.json").read_text())
    assert {r["model"] for r in rows} == set(list_models())
    assert main(["models", "q2l", "--paper"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()[1:]
    assert lines and all(line.startswith("q2l ") for line in lines)


def test_dataset_of_a_config() -> None:
    assert dataset_of({"format": "voc", "root": "data/VOCdevkit/VOC2007"}) == "voc2007"
    assert dataset_of({"format": "voc", "root": "/x/VOC2012/"}) == "voc2012"
    coco = {"format": "coco", "train": "annotations/instances_train2014.json"}
    assert dataset_of(coco) == "coco2014"
    assert dataset_of({"format": "coco", "train": "instances_train2017.json"}) is None
    assert dataset_of({"format": "vg500"}) == "vg500"
    assert dataset_of({"format": "csv", "root": "voc2007"}) is None


def test_paper_comparison_says_what_differs() -> None:
    cfg = to_dict(load_config(resolve_config_path("ssgrl_voc2007")))
    cfg["model"]["backbone"] = "resnet50"
    lines = paper_comparison("ssgrl", cfg, {"mAP": 0.9, "CF1": 0.8, "OF1": 0.85}, 448, "test")
    text = "\n".join(lines)
    assert "| this run (PASCAL VOC 2007) | 90.00 | 80.00 | 85.00 |" in text
    assert "| 93.40 |" in text and "HCPLab-SYSU" in text
    assert "backbone `resnet50`" in text and "input `448` px; the paper's: 576 px" in text
    assert "selected on the validation split" in text
    assert "evaluated on" not in text  # VOC 2007 test, as the paper
    same = paper_comparison(
        "ssgrl",
        to_dict(load_config(resolve_config_path("ssgrl_voc2007"))),
        {"mAP": 0.9},
        576,
        "test",
    )
    assert not any("backbone" in line or "input" in line for line in same)
    coco = to_dict(load_config(resolve_config_path("mlgcn_coco2014"), ["train.epochs=5"]))
    text = "\n".join(paper_comparison("mlgcn", coco, {"mAP": 0.5}, 448, "x/instances_val2014.json"))
    assert "`5` epochs; the paper's: 100" in text and "best test mAP" in text
    hostile = dict(coco, model={"backbone": "a`|b\n# x", "pretrained": True})
    assert "`a  b # x`" in "\n".join(paper_comparison("mlgcn", hostile, {"mAP": "x"}, 448))
    assert paper_comparison("mgsgn", coco, {"mAP": 0.5}) == []  # no published figure
    assert paper_comparison("baseline", {"data": {"format": "csv"}}, {"mAP": 0.5}) == []


def test_eval_report_and_hub_card_show_the_paper(holdout_runs, tmp_path: Path) -> None:
    from mlic.evaluate import evaluate_checkpoint
    from mlic.hub import build_push_folder

    run = holdout_runs[0]["run_dir"]  # baseline on a folder named VOC2007
    ev = evaluate_checkpoint(run, ["run.progress=false"], output=tmp_path / "ev")
    report = Path(ev["report"]).read_text()
    assert "## The paper's result beside this run" in report
    assert "| 91.70 |" in report and "ML-GCN" in report  # the baseline row ML-GCN reports
    assert "input `32` px; the paper's: 448 px" in report
    assert "held-out training images" in report  # this run's selection
    card = (build_push_folder(run, "someone/tiny", tmp_path / "push") / "README.md").read_text()
    assert "## The paper's result beside this run" in card and "| 91.70 |" in card
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["train"]["select_on"] == "holdout"


def test_the_resize_protocol_travels_to_predict_and_export(tmp_path: Path) -> None:
    """A run trained with data.resize (SSGRL's warp + centre crop) is preprocessed the same way
    by mlic predict, serve and the exported graph's metadata; a hostile value is refused."""
    from PIL import Image

    from mlic.engine.checkpoint import read_metadata, save_checkpoint, validate_metadata
    from mlic.errors import CheckpointError
    from mlic.export import _metadata
    from mlic.inference import Predictor
    from mlic.serve.validation import ImagePreparer, Limits

    names = ["a", "b", "c"]
    model = mlic.create_model("baseline", 3, backbone=TINY_BACKBONE, pretrained=False)
    ckpt = save_checkpoint(
        model, tmp_path / "m.safetensors", names, input_size=[3, 32, 32], resize=40
    )
    meta = read_metadata(ckpt)
    # a 40 x 40 photo with a 4 px red frame: the warp to 40 and the centre 32 crop cut it away
    arr = np.zeros((40, 40, 3), np.uint8)
    arr[:4], arr[-4:], arr[:, :4], arr[:, -4:] = 255, 255, 255, 255
    photo = Image.fromarray(arr)
    predictor = Predictor.from_checkpoint(ckpt)
    x = predictor.transform(photo)  # [3, 32, 32] normalised
    black = build_transform(32, meta["mean"], meta["std"], False)(Image.new("RGB", (40, 40)))
    assert torch.allclose(x, black)
    plain = Predictor(model, {**meta, "resize": None})
    assert not torch.allclose(plain.transform(photo), black)  # without it the frame is seen
    preparer = ImagePreparer(32, Limits(), meta["resize"])  # serve: the same pixels
    assert (preparer.resize(photo).numpy() == 0).all()
    # export at another size scales the warp with it
    assert json.loads(_metadata(model, meta, 64)["resize"]) == 80
    for bad in (16, 5000, 40.5, True, "40"):
        with pytest.raises(CheckpointError, match="resize"):
            validate_metadata({**meta, "resize": bad}, "checkpoint")
