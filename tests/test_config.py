import pytest

from deepfm_dist.config import ConfigError, load_config


def test_defaults_and_overrides(tmp_path):
    cfg = load_config([])
    assert cfg.train.batch_size == 2048 and cfg.model.mlp == [400, 400, 400]
    cfg = load_config(["--train.epochs=3", "--model.mlp", "64,32", "--data.train=a.parquet,b/", "--run_dir=/tmp/x",
                       "--model.batch_norm=false", "--sharding.tables=C1:row_wise,C2:column_wise"])
    assert cfg.train.epochs == 3 and cfg.model.mlp == [64, 32] and cfg.data.train == ["a.parquet", "b/"]
    assert cfg.run_dir == "/tmp/x" and cfg.model.batch_norm is False
    assert cfg.sharding.tables == {"C1": "row_wise", "C2": "column_wise"}


def test_toml_file_then_override(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('run_dir = "r"\n[train]\nbatch_size = 64\nepochs = 2\n[model]\nembedding_dim = 8\n')
    cfg = load_config(["--config", str(path), "--train.epochs=5"])
    assert (cfg.train.batch_size, cfg.train.epochs, cfg.model.embedding_dim, cfg.run_dir) == (64, 5, 8, "r")
    assert cfg.model.mlp == [400, 400, 400]  # keys absent from the file keep their defaults


@pytest.mark.parametrize(
    "args, words",
    [
        (["--train.batch_size=0"], ["train.batch_size", "0", "positive"]),
        (["--train.batch_size=abc"], ["train.batch_size", "abc", "integer"]),
        (["--model.embedding_dim=-3"], ["model.embedding_dim", "-3"]),
        (["--model.mlp=400,x"], ["model.mlp", "x", "integer"]),
        (["--model.activation=swish"], ["model.activation", "swish", "relu"]),
        (["--sharding.type=diagonal"], ["sharding.type", "diagonal", "row_wise"]),
        (["--optimizer.embedding=lamb"], ["optimizer.embedding", "lamb", "rowwise_adagrad"]),
        (["--optimizer.decay=step"], ["optimizer.decay_steps", "positive"]),
        (["--checkpoint.keep=0"], ["checkpoint.keep", "0"]),
        (["--train.bogus=1"], ["train.bogus", "batch_size"]),
        (["--nosuch.key=1"], ["nosuch.key", "sections"]),
        (["--model.dropout=1.5"], ["model.dropout", "1.5"]),
        (["--model.batch_norm=maybe"], ["model.batch_norm", "maybe", "boolean"]),
        (["--data.num_embeddings_per_feature=10,20"], ["data.num_embeddings_per_feature", "26"]),
        (["--sharding.tables=C99:row_wise"], ["sharding.tables", "C99"]),
        (["positional"], ["positional"]),
        (["--train.epochs"], ["--train.epochs", "missing"]),
    ],
)
def test_bad_values_name_key_value_and_allowed(args, words):
    with pytest.raises(ConfigError) as e:
        load_config(args)
    for w in words:
        assert w in str(e.value), (w, str(e.value))


def test_bad_config_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(["--config", str(tmp_path / "missing.toml")])
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(["--config", str(bad)])
    typed = tmp_path / "typed.toml"
    typed.write_text('[train]\nepochs = "two"\n')
    with pytest.raises(ConfigError, match="train.epochs"):
        load_config(["--config", str(typed)])


def test_main_exits_2_with_message(capsys):
    from deepfm_dist.train import main

    with pytest.raises(SystemExit) as e:
        main(["--train.batch_size=-1"])
    assert e.value.code == 2
    assert "train.batch_size=-1" in capsys.readouterr().err


def test_empty_mlp_is_refused_and_none_is_explicit():
    with pytest.raises(ConfigError, match="model.mlp='': empty.*'none'"):
        load_config(["--model.mlp="])
    assert load_config(["--model.mlp=none"]).model.mlp == []
    assert load_config(["--model.mlp=64, 32"]).model.mlp == [64, 32]


@pytest.mark.parametrize("value", ["1e38", "inf", "nan", "0", "-0.1"])
@pytest.mark.parametrize("key", ["optimizer.dense_lr", "optimizer.embedding_lr"])
def test_learning_rates_are_validated_naming_the_key(key, value):
    with pytest.raises(ConfigError, match=f"{key}=.*positive float <= 1000"):
        load_config([f"--{key}={value}"])


def test_shm_all_to_all_needs_shared_memory():
    with pytest.raises(ConfigError, match="sharding.shm_all_to_all"):
        load_config(["--sharding.shm_all_to_all=true", "--sharding.intra_node_comm=gloo"])
