"""The whole study is checked before any work: every problem is reported at once, with its
field and the valid choices, and nothing is created or trained."""

from __future__ import annotations

import pytest
from study_helpers import CALLS, tiny

from ridgeline.errors import ConfigError
from ridgeline.study import config_from_dict, load_config, run_study
from ridgeline.study.validate import validate_study


def _refused(tmp_path, config: dict) -> str:
    """The error of a study that must be refused before its run folder exists."""
    run = tmp_path / "run"
    CALLS.clear()
    with pytest.raises(ConfigError) as info:
        run_study(config_from_dict(config), run, progress=False)
    assert not run.exists() and CALLS == []
    return str(info.value)


def test_a_measurement_naming_a_missing_model_is_refused_before_training(tmp_path):
    config = tiny()
    config["measurements"][1]["models"] = ["b", "c"]
    message = _refused(tmp_path, config)
    assert "measurements[1] ('uses-b').models: the study has no model 'c'" in message
    assert "its models are ['a', 'b']" in message and "nothing was run" in message


def test_unknown_names_are_refused_with_the_valid_choices(tmp_path):
    config = tiny()
    config["data"] = {"name": "mnist2d"}
    config["models"][0]["factory"] = "perceiver"
    config["training"]["optimizer"] = "adagrad"
    config["measurements"].append({"kind": "wieghts_sum"})
    message = _refused(tmp_path, config)
    assert "4 problems" in message
    assert "data.name: unknown dataset 'mnist2d'; the datasets are" in message
    assert "'digits'" in message and "'mnist1d'" in message
    assert "models.a.factory: unknown model factory 'perceiver'; the factories are" in message
    assert "'mlp'" in message
    assert "unknown optimizer 'adagrad'; the optimizers are" in message and "'sam'" in message
    assert "unknown measurement kind 'wieghts_sum'; the kinds are" in message
    assert "'weights_sum'" in message


def test_argument_and_override_typos_are_refused(tmp_path):
    config = tiny()
    config["data"]["args"]["num_sample"] = 10
    config["models"][0]["args"]["width"] = [8]
    config["models"][1]["training"] = {"epoch": 3}
    config["measurements"][0]["lable"] = "x"
    message = _refused(tmp_path, config)
    assert "data.args: dataset 'gaussian_mixture' cannot be called with" in message
    assert "unexpected keyword argument 'num_sample'" in message
    assert "Its signature is gaussian_mixture(num_samples" in message  # the valid arguments
    assert "models.a.args: model 'mlp' cannot be called with" in message
    assert "unexpected keyword argument 'width'" in message
    assert "Its signature is mlp(in_features" in message
    assert "training overrides of model 'b': unknown key 'epoch'" in message
    assert "unknown option 'lable'" in message and "Options of 'weights_sum' are" in message


@pytest.mark.parametrize("where,value", [("data.train_subset", -5), ("data.test_subset", 0),
                                         ("measurement.subset", -5), ("training.lr", -1.0),
                                         ("training.batch_size", 0)])
def test_negative_sizes_are_refused(tmp_path, where, value):
    config = tiny()
    if where.startswith("measurement"):
        config["measurements"] = [{"kind": "slice", "model": "a", "subset": value}]
        with pytest.raises(ConfigError, match=r"\.subset: a subset must be at least 1"):
            run_study(config_from_dict(config), tmp_path / "run", progress=False)
        assert not (tmp_path / "run").exists()
        return
    table, key = where.split(".")
    config[table][key] = value
    with pytest.raises(ConfigError, match=f"'{where}'"):
        config_from_dict(config)


def test_data_that_does_not_fit_a_model_is_refused_before_training(tmp_path):
    config = tiny()
    config["models"][1]["args"]["in_features"] = 5  # the data has 4 features
    config["models"][0]["args"]["out_features"] = 2  # the data has 3 classes
    message = _refused(tmp_path, config)
    assert "models.b on the train data" in message and "cannot be applied to inputs" in message
    assert "models.a on the train data" in message and "labels range over [0, 2]" in message


def test_training_options_and_splits_are_checked(tmp_path):
    config = tiny()
    config["models"][0]["training"] = {"optimizer": "sam", "options": {"rho_typo": 0.1}}
    config["models"][1]["training"] = {"loss": "crossentropy"}
    config["measurements"] = [{"kind": "slice", "model": "a", "split": "validation"}]
    message = _refused(tmp_path, config)
    assert "training of model 'a': bad options for optimizer 'sam'" in message
    assert "rho_typo" in message
    assert "models.b.training.loss: unknown loss 'crossentropy'; the losses are" in message
    assert ".split: unknown split(s) ['validation']; the splits are ['train', 'test']" in message


def test_a_model_used_before_its_explicit_training_is_refused(tmp_path):
    config = tiny()
    config["measurements"] = [{"kind": "weights_sum", "id": "early", "models": ["b"]},
                              {"kind": "train", "model": "b"}]
    message = _refused(tmp_path, config)
    assert "model 'b' is trained by measurements[1], after this one" in message


def test_the_default_study_validates():
    validate_study(load_config(preset="quick"))  # names and arguments, no data


def test_instrument_options_are_checked_before_training(tmp_path):
    config = tiny()
    config["measurements"] = [
        {"kind": "connectivity", "models": ["a", "b", "a"]},
        {"kind": "barrier_prediction", "align": "weight"},
        {"kind": "slice", "model": "a", "directions": "models"},
        {"kind": "slice", "id": "slice-2", "model": "a", "directions": "pca"},
        {"kind": "sharpness_aware", "model": "a", "methods": ["sgd", "sma"]},
        {"kind": "forward_gradient", "model": "a", "guesses": ["random", "locale"]},
        {"kind": "intrinsic_dimension", "model": "a", "projection": "gaussian"},
    ]
    message = _refused(tmp_path, config)
    assert "7 problems" in message
    assert "'models': List should have at most 2 items" in message
    assert "'align': Input should be 'weights' or 'activations'" in message
    assert "directions = 'models' needs others = [model names]" in message
    assert "'directions': Input should be 'filter', 'hessian' or 'models'" in message
    assert "methods: unknown training method 'sma'" in message
    assert "guesses: unknown guess 'locale'; the guesses are" in message
    assert "projection: unknown projection 'gaussian'; the projections are" in message


def test_user_code_that_does_not_resolve_is_refused_before_training(tmp_path):
    config = tiny()
    config["data"] = {"name": "ridgeline.data:no_such_loader"}
    config["models"][0]["factory"] = "no_such_package.nets:make"
    message = _refused(tmp_path, config)
    assert "data.name: data function 'ridgeline.data:no_such_loader'" in message
    assert "has no attribute 'no_such_loader'" in message
    assert "models.a.factory: model factory 'no_such_package.nets:make': cannot import" in message
