"""`ldae-fast export` from a single-device checkpoint: the file is a plain timm ViT, strictly."""

import json

import pytest
import torch

from ldae_fast.config import build_config

timm = pytest.importorskip("timm")

TINY = {
    "model.width": "32", "model.num_heads": "2", "model.encoder_depth": "2", "model.decoder_depth": "1",
    "data.img_size": "16", "data.batch_size": "8", "data.synthetic_images": "32", "tokenizer.fit_images": "16",
    "engine.kernels": "reference", "engine.log_every": "2", "engine.progress": "false", "engine.steps": "2",
    "eval.probe": "false", "eval.figure": "false",
}


@pytest.mark.parametrize("use_ema", [True, False])
def test_export_is_a_timm_local_dir_with_matching_features(tmp_path, monkeypatch, use_ema):
    from ldae_fast.data.transforms import IMAGENET_MEAN, IMAGENET_STD
    from ldae_fast.engine.loop import train
    from ldae_fast.eval.export import _meta, main
    from ldae_fast.eval.reader import load_exported_encoder, load_for_eval

    # The whole recipe must work offline: a hub lookup would fail here rather than be skipped.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    res = train(build_config("demo", {**TINY, "engine.out_dir": str(tmp_path / "run")}))
    out = tmp_path / "enc"
    assert main([str(res.checkpoint), str(out)] + ([] if use_ema else ["--no-ema"])) == 0
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    assert _meta(out / "model.safetensors")["weights"] == ("ema" if use_ema else "model")

    vit = timm.create_model(f"local-dir:{out}", pretrained=True).eval()  # strict load
    data_cfg = timm.data.resolve_data_config({}, model=vit)
    assert data_cfg["input_size"] == (3, 16, 16)
    assert data_cfg["mean"] == pytest.approx(IMAGENET_MEAN) and data_cfg["std"] == pytest.approx(IMAGENET_STD)
    assert vit.num_classes == 0 and vit.global_pool == "avg"

    _, ours, _ = load_for_eval(res.checkpoint, use_ema=use_ema)
    torch.manual_seed(0)
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        want = ours.encoder.forward_features(x, sigma=torch.zeros(3))
        got = vit.forward_features(x)
        pooled = vit(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # timm's pooled feature (global_pool='avg', no fc_norm) is our linear-probe feature.
    torch.testing.assert_close(pooled, want[:, 1:].mean(1), rtol=1e-5, atol=1e-5)

    # The activation comes from config.json, exactly ours; timm's default (erf GELU) is not. The
    # features above cannot tell: after 2 steps the folded adaLN gates almost mute the MLPs.
    z = torch.linspace(-4, 4, 81)
    assert json.loads((out / "config.json").read_text())["model_args"]["act_layer"] == "gelu_tanh"
    torch.testing.assert_close(vit.blocks[0].mlp.act(z), ours.encoder.blocks[0].mlp.act(z), rtol=0, atol=0)
    assert not torch.allclose(torch.nn.GELU()(z), ours.encoder.blocks[0].mlp.act(z), rtol=0, atol=1e-5)
    # The weights the export was asked for, not the other set: EMA and raw differ after 2 steps.
    _, other, _ = load_for_eval(res.checkpoint, use_ema=not use_ema)
    with torch.no_grad():
        assert not torch.allclose(other.encoder.forward_features(x, sigma=torch.zeros(3)), want)
    # The eval side reads the weights file (load_for_eval) and the directory (the reader) alike.
    for _, enc, _ in (load_for_eval(out / "model.safetensors"), load_exported_encoder(out)):
        with torch.no_grad():
            torch.testing.assert_close(enc.encoder.forward_features(x), want, rtol=1e-5, atol=1e-5)


def test_export_refuses_an_existing_file_as_its_directory(tmp_path, capsys):
    from ldae_fast.eval.export import main

    target = tmp_path / "enc.safetensors"  # e.g. an export in the older single-file format
    target.write_bytes(b"not ours")
    # Refused before the checkpoint is even looked at, and the file is left alone.
    assert main([str(tmp_path / "nope"), str(target)]) == 2
    assert "is not a directory" in capsys.readouterr().err
    assert target.read_bytes() == b"not ours"


def test_export_of_missing_checkpoint_is_a_clean_error(tmp_path, capsys):
    from ldae_fast.eval.export import main

    assert main([str(tmp_path / "nope"), str(tmp_path / "x")]) == 4  # file error
    err = capsys.readouterr().err
    assert "error: checkpoint" in err and "--resume" not in err
