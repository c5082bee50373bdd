"""Bad config values are refused where they are read: one ConfigError (WeightsError for weights) naming the file
and the key, never a traceback from deep inside the math or a silently wrong picture.

A small valid pipeline folder is written with mdref's own save_pretrained; each row of `CASES` copies it, changes
one file (one key, or the whole text) and loads it with the public API. A few rows go through the CLI too.
"""

import json
import os
import shutil

import numpy as np
import pytest

import mdref
from mdref import ConfigError, Decoder, Pipeline, TextEncoder, Tokenizer, UNet, WeightsError
from mdref.cli import main
from mdref.io.scheduler_config import SchedulerConfig, scheduler_config_to_dict

DELETE = object()
NAN, INF = float("nan"), float("inf")

TEXT_ENCODER = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                    pad_token_id=49407)
UNET = dict(sample_size=4, in_channels=4, out_channels=4, block_out_channels=[32, 32], layers_per_block=1,
            down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"], up_block_types=["UpBlock2D",
            "CrossAttnUpBlock2D"], cross_attention_dim=16, attention_head_dim=2, norm_num_groups=8,
            prediction_type="sample")
VAE = dict(kind="kl", latent_channels=4, block_out_channels=[8, 16], layers_per_block=1, norm_num_groups=8,
           scaling_factor=0.5)
TINY_VAE = {"_class_name": "AutoencoderTiny", "latent_channels": 4, "decoder_block_out_channels": [8, 8],
            "num_decoder_blocks": [1, 1], "scaling_factor": 1.0}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A valid pipeline folder: tokenizer/, text_encoder/, unet/ (predicts x0: 'sample'), vae/, scheduler/."""
    folder = tmp_path_factory.mktemp("hardening") / "base"
    TextEncoder.from_config(TEXT_ENCODER).save_pretrained(folder / "text_encoder")
    UNet.from_config(UNET).save_pretrained(folder / "unet")
    Decoder.from_config(VAE).save_pretrained(folder / "vae")
    Tokenizer.from_pretrained(None).save_pretrained(folder / "tokenizer")
    (folder / "scheduler").mkdir()
    (folder / "scheduler" / "scheduler_config.json").write_text(
        json.dumps(scheduler_config_to_dict(SchedulerConfig(prediction_type="sample"))))
    return folder


def copy_of(base, dest):
    """A copy of the base folder; weights are hard links (no row writes to them), all other files are copies."""
    def copy(src, dst):
        (os.link if src.endswith(".safetensors") else shutil.copy2)(src, dst)
    shutil.copytree(base, dest, copy_function=copy)
    return dest


def test_base_folder_is_valid(base, tmp_path):
    pipe = Pipeline.from_pretrained(copy_of(base, tmp_path / "m"))
    assert pipe.scheduler.prediction_type == "sample" and pipe.run("a red circle").pixels.shape == (1, 8, 8, 3)


LOADERS = {"text_encoder": TextEncoder.from_pretrained, "unet": UNet.from_pretrained,
           "vae": Decoder.from_pretrained, "pipeline": Pipeline.from_pretrained}

# (id, file in the folder, change, loader, key the message must name). change: {key: value or DELETE} applied to
# the file's JSON object, or a str / bytes that replaces the whole file.
S, T, U, V, IDX = ("scheduler/scheduler_config.json", "text_encoder/config.json", "unet/config.json",
                   "vae/config.json", "text_encoder/model.safetensors.index.json")
CASES = [
    # ---- scheduler ----------------------------------------------------------------------------------------
    ("beta_end negative", S, {"beta_end": -0.01}, "pipeline", "beta_end"),
    ("beta_start zero", S, {"beta_start": 0}, "pipeline", "beta_start"),
    ("beta_start string", S, {"beta_start": "0.0001"}, "pipeline", "beta_start"),
    ("beta_end one", S, {"beta_end": 1.0}, "pipeline", "beta_end"),
    ("beta_end NaN", S, {"beta_end": NAN}, "pipeline", "beta_end"),
    ("beta_start above beta_end", S, {"beta_start": 0.03}, "pipeline", "beta_start"),
    ("num_train_timesteps 1", S, {"num_train_timesteps": 1}, "pipeline", "num_train_timesteps"),
    ("num_train_timesteps bool", S, {"num_train_timesteps": True}, "pipeline", "num_train_timesteps"),
    ("num_train_timesteps float", S, {"num_train_timesteps": 1000.0}, "pipeline", "num_train_timesteps"),
    ("beta_schedule unknown", S, {"beta_schedule": "squaredcos_cap_v2"}, "pipeline", "beta_schedule"),
    ("prediction_type unknown", S, {"prediction_type": "flow"}, "pipeline", "prediction_type"),
    ("sampler unknown", S, {"sampler": "ddim"}, "pipeline", "sampler"),
    ("timestep_spacing leading", S, {"timestep_spacing": "leading"}, "pipeline", "timestep_spacing"),
    ("scheduler a JSON list", S, "[]", "pipeline", "JSON object"),
    ("scheduler empty object", S, "{}", "pipeline", "prediction_type"),
    ("scheduler without prediction_type", S, {"prediction_type": DELETE}, "pipeline", "prediction_type"),
    ("scheduler without beta_end", S, {"beta_end": DELETE}, "pipeline", "beta_end"),
    ("scheduler not JSON", S, "beta_end = 0.02", "pipeline", "JSON"),
    ("prediction_type contradicts the UNet", S, {"prediction_type": "epsilon"}, "pipeline", "unet/config.json"),
    ("euler beta_end negative", S, {"_class_name": "EulerDiscreteScheduler", "sampler": DELETE, "beta_end": -1},
     "pipeline", "beta_end"),
    # ---- text encoder -------------------------------------------------------------------------------------
    ("num_attention_heads 0", T, {"num_attention_heads": 0}, "text_encoder", "num_attention_heads"),
    ("hidden_size string", T, {"hidden_size": "64"}, "text_encoder", "hidden_size"),
    ("hidden_size not divisible", T, {"hidden_size": 15}, "text_encoder", "hidden_size"),
    ("text config a JSON list", T, "[1, 2]", "text_encoder", "JSON object"),
    ("vocab_size 0", T, {"vocab_size": 0}, "text_encoder", "vocab_size"),
    ("intermediate_size negative", T, {"intermediate_size": -4}, "text_encoder", "intermediate_size"),
    ("num_hidden_layers float", T, {"num_hidden_layers": 1.5}, "text_encoder", "num_hidden_layers"),
    ("max_position_embeddings 0", T, {"max_position_embeddings": 0}, "text_encoder", "max_position_embeddings"),
    ("eos_token_id beyond vocab", T, {"eos_token_id": 49408}, "text_encoder", "eos_token_id"),
    ("eos_token_id null", T, {"eos_token_id": None}, "text_encoder", "eos_token_id"),
    ("bos_token_id negative", T, {"bos_token_id": -1}, "text_encoder", "bos_token_id"),
    ("pad_token_id string", T, {"pad_token_id": "<pad>"}, "text_encoder", "pad_token_id"),
    ("layer_norm_eps 0", T, {"layer_norm_eps": 0}, "text_encoder", "layer_norm_eps"),
    ("layer_norm_eps string", T, {"layer_norm_eps": "1e-5"}, "text_encoder", "layer_norm_eps"),
    ("layer_norm_eps infinite", T, {"layer_norm_eps": INF}, "text_encoder", "layer_norm_eps"),
    ("hidden_act unknown", T, {"hidden_act": "swish"}, "text_encoder", "hidden_act"),
    ("text config not UTF-8", T, b'{"hidden_act": "\xff"}', "text_encoder", "UTF-8"),
    # ---- sharded weights index ----------------------------------------------------------------------------
    ("index not JSON", IDX, "{weight_map", "text_encoder", "JSON"),
    ("index a JSON list", IDX, "[]", "text_encoder", "JSON object"),
    ("index without weight_map", IDX, '{"metadata": {}}', "text_encoder", "weight_map"),
    ("index weight_map empty", IDX, '{"weight_map": {}}', "text_encoder", "weight_map"),
    ("index weight_map a list", IDX, '{"weight_map": ["model.safetensors"]}', "text_encoder", "weight_map"),
    ("index shard not a string", IDX, '{"weight_map": {"a": 3}}', "text_encoder", "weight_map['a']"),
    ("index shard escapes the folder", IDX, '{"weight_map": {"a": "../x.safetensors"}}', "text_encoder",
     "weight_map['a']"),
    ("index shard absolute", IDX, '{"weight_map": {"a": "/tmp/x.safetensors"}}', "text_encoder", "weight_map['a']"),
    ("index shard a pickle", IDX, '{"weight_map": {"a": "pytorch_model.bin"}}', "text_encoder", "weight_map['a']"),
    # ---- tokenizer ----------------------------------------------------------------------------------------
    ("tokenizer_config not JSON", "tokenizer/tokenizer_config.json", "{", "pipeline", "tokenizer_config.json"),
    ("tokenizer_config a list", "tokenizer/tokenizer_config.json", "[]", "pipeline", "tokenizer_config.json"),
    ("tokenizer_config pad_token int", "tokenizer/tokenizer_config.json", {"pad_token": 5}, "pipeline", "pad_token"),
    ("tokenizer_config model_max_length string", "tokenizer/tokenizer_config.json", {"model_max_length": "77"},
     "pipeline", "model_max_length"),
    ("special_tokens_map not JSON", "tokenizer/special_tokens_map.json", "pad", "pipeline",
     "special_tokens_map.json"),
    ("special_tokens_map content not a string", "tokenizer/special_tokens_map.json", {"bos_token": {"content": 3}},
     "pipeline", "bos_token"),
    ("merges.txt not UTF-8", "tokenizer/merges.txt", b"#version: 0.2\n\xe9 t\n", "pipeline", "merges.txt"),
    ("vocab.json not UTF-8", "tokenizer/vocab.json", b'{"\xe9": 0}', "pipeline", "vocab.json"),
    ("vocab.json a list", "tokenizer/vocab.json", "[]", "pipeline", "vocab.json"),
    ("vocab.json ids not ints", "tokenizer/vocab.json", '{"a": "0"}', "pipeline", "vocab.json"),
    # ---- UNet ---------------------------------------------------------------------------------------------
    ("norm_num_groups 0", U, {"norm_num_groups": 0}, "unet", "norm_num_groups"),
    ("norm_num_groups string", U, {"norm_num_groups": "8"}, "unet", "norm_num_groups"),
    ("unet norm_eps string", U, {"norm_eps": "1e-5"}, "unet", "norm_eps"),
    ("unet norm_eps 0", U, {"norm_eps": 0}, "unet", "norm_eps"),
    ("unet norm_eps NaN", U, {"norm_eps": NAN}, "unet", "norm_eps"),
    ("channels not divisible by groups", U, {"block_out_channels": [32, 36]}, "unet", "block_out_channels"),
    ("channels negative", U, {"block_out_channels": [32, -32]}, "unet", "block_out_channels[1]"),
    ("channels zero", U, {"block_out_channels": [0, 32]}, "unet", "block_out_channels[0]"),
    ("in_channels 0", U, {"in_channels": 0}, "unet", "in_channels"),
    ("out_channels string", U, {"out_channels": "4"}, "unet", "out_channels"),
    ("sample_size 0", U, {"sample_size": 0}, "unet", "sample_size"),
    ("sample_size one entry", U, {"sample_size": [4]}, "unet", "sample_size"),
    ("freq_shift negative", U, {"freq_shift": -1}, "unet", "freq_shift"),
    ("freq_shift divides by zero", U, {"freq_shift": 16}, "unet", "freq_shift"),
    ("flip_sin_to_cos int", U, {"flip_sin_to_cos": 1}, "unet", "flip_sin_to_cos"),
    ("use_linear_projection string", U, {"use_linear_projection": "yes"}, "unet", "use_linear_projection"),
    ("upcast_attention null", U, {"upcast_attention": None}, "unet", "upcast_attention"),
    ("layers_per_block 0", U, {"layers_per_block": 0}, "unet", "layers_per_block"),
    ("attention_head_dim 0", U, {"attention_head_dim": 0}, "unet", "attention_head_dim"),
    ("cross_attention_dim string", U, {"cross_attention_dim": "16"}, "unet", "cross_attention_dim"),
    ("down_block_types a string", U, {"down_block_types": "CrossAttnDownBlock2D"}, "unet", "down_block_types"),
    ("mid_block_type unknown", U, {"mid_block_type": "UNetMidBlock2D"}, "unet", "mid_block_type"),
    ("unet prediction_type unknown", U, {"prediction_type": "x0"}, "unet", "prediction_type"),
    ("unet config a JSON list", U, "[]", "unet", "JSON object"),
    # ---- VAE ----------------------------------------------------------------------------------------------
    ("scaling_factor string", V, {"scaling_factor": "abc"}, "vae", "scaling_factor"),
    ("scaling_factor 0", V, {"scaling_factor": 0}, "vae", "scaling_factor"),
    ("scaling_factor infinite", V, {"scaling_factor": INF}, "vae", "scaling_factor"),
    ("shift_factor NaN", V, {"shift_factor": NAN}, "vae", "shift_factor"),
    ("shift_factor string", V, {"shift_factor": "0"}, "vae", "shift_factor"),
    ("vae norm_num_groups 0", V, {"norm_num_groups": 0}, "vae", "norm_num_groups"),
    ("vae channels not divisible", V, {"block_out_channels": [8, 12]}, "vae", "block_out_channels"),
    ("vae channels negative", V, {"block_out_channels": [-8, 16]}, "vae", "block_out_channels[0]"),
    ("latent_channels 0", V, {"latent_channels": 0}, "vae", "latent_channels"),
    ("vae layers_per_block negative", V, {"layers_per_block": -1}, "vae", "layers_per_block"),
    ("use_post_quant_conv string", V, {"use_post_quant_conv": "true"}, "vae", "use_post_quant_conv"),
    ("vae norm_eps 0", V, {"norm_eps": 0}, "vae", "norm_eps"),
    ("tiny tiny_clamp 0", V, json.dumps({**TINY_VAE, "tiny_clamp": 0}), "vae", "tiny_clamp"),
    ("tiny upsampling 0", V, json.dumps({**TINY_VAE, "upsampling_scaling_factor": 0}), "vae",
     "upsampling_scaling_factor"),
    ("tiny blocks 0", V, json.dumps({**TINY_VAE, "num_decoder_blocks": [1, 0]}), "vae", "num_decoder_blocks[1]"),
    ("tiny channels a number", V, json.dumps({**TINY_VAE, "decoder_block_out_channels": 8}), "vae",
     "decoder_block_out_channels"),
]


def apply(folder, file, change):
    path = folder / file
    if isinstance(change, bytes):
        path.write_bytes(change)
    elif isinstance(change, str):
        path.write_text(change)
    else:
        d = json.loads(path.read_text()) if path.is_file() else {}
        for k, v in change.items():
            if v is DELETE:
                d.pop(k, None)
            else:
                d[k] = v
        path.write_text(json.dumps(d))                     # NaN / Infinity as Python's json writes them
    return path


@pytest.mark.parametrize("file, change, loader, key", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_value_is_one_named_config_error(base, tmp_path, file, change, loader, key):
    folder = copy_of(base, tmp_path / "m")
    path = apply(folder, file, change)
    target = folder if loader == "pipeline" else folder / loader
    with pytest.raises(ConfigError) as e:
        LOADERS[loader](target)
    message = str(e.value)
    assert str(path) in message and key in message, message


def test_case_table_is_large_and_unique():
    assert len(CASES) >= 40 and len({c[0] for c in CASES}) == len(CASES)


def test_contradiction_names_both_files(base, tmp_path):
    folder = copy_of(base, tmp_path / "m")
    apply(folder, S, {"prediction_type": "epsilon"})
    with pytest.raises(ConfigError) as e:
        Pipeline.from_pretrained(folder)
    assert str(folder / S) in str(e.value) and str(folder / U) in str(e.value) and "'sample'" in str(e.value)


def test_unet_without_prediction_type_follows_the_scheduler(base, tmp_path):
    """diffusers' UNet configs state no prediction_type: the scheduler's is then taken as it is."""
    folder = copy_of(base, tmp_path / "m")
    apply(folder, U, {"prediction_type": DELETE})
    apply(folder, S, {"prediction_type": "v_prediction"})
    assert Pipeline.from_pretrained(folder).scheduler.prediction_type == "v_prediction"


def test_sharded_checkpoint_loads_and_missing_shard_is_a_weights_error(base, tmp_path):
    """A valid index (two shards) loads the same tensors; an index naming a shard that is not there is a
    WeightsError naming it."""
    from mdref.formats.safetensors import read_safetensors, write_safetensors
    folder = copy_of(base, tmp_path / "m") / "text_encoder"
    flat = read_safetensors(folder / "model.safetensors")[0]
    (folder / "model.safetensors").unlink()
    keys = sorted(flat)
    shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    for name, ks in shards.items():
        write_safetensors(folder / name, {k: flat[k] for k in ks}, {"format": "pt"})
    index = {"metadata": {}, "weight_map": {k: name for name, ks in shards.items() for k in ks}}
    apply(folder.parent, IDX, json.dumps(index))
    te = TextEncoder.from_pretrained(folder)
    ids = Tokenizer.from_pretrained(None)(["a red circle"])
    np.testing.assert_array_equal(te(ids), TextEncoder.from_pretrained(base / "text_encoder")(ids))
    (folder / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(WeightsError, match="model-00002-of-00002.safetensors"):
        TextEncoder.from_pretrained(folder)


@pytest.mark.parametrize("file, change, key", [
    (S, {"beta_end": -0.01}, "beta_end"), (T, {"num_attention_heads": 0}, "num_attention_heads"),
    (V, {"scaling_factor": 0}, "scaling_factor"), (S, "{}", "prediction_type"),
    (U, {"norm_num_groups": 0}, "norm_num_groups"),
], ids=["beta_end", "heads", "scaling_factor", "empty scheduler", "groups"])
def test_cli_reports_one_line_and_exit_2(base, tmp_path, capsys, file, change, key):
    folder = copy_of(base, tmp_path / "m")
    apply(folder, file, change)
    code = main(["info", "--model", str(folder)])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("mdref: error:")]
    assert code == 2 and len(lines) == 1 and key in lines[0] and "Traceback" not in err, err


def test_shipped_default_model_still_loads():
    if not (mdref.pipeline.DEFAULT_MODEL_DIR / "unet").is_dir():
        pytest.skip("no default model in weights/default")
    assert Pipeline.from_pretrained().scheduler.prediction_type == "sample"
