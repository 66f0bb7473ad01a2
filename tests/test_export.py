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
def test_export_loads_strictly_in_timm_and_matches_features(tmp_path, use_ema):
    from safetensors.torch import load_file

    from ldae_fast.engine.checkpoint import load_for_eval
    from ldae_fast.engine.export import _meta, main
    from ldae_fast.engine.loop import train

    res = train(build_config("demo", {**TINY, "engine.out_dir": str(tmp_path / "run")}))
    out = tmp_path / "enc.safetensors"
    assert main([str(res.checkpoint), str(out)] + ([] if use_ema else ["--no-ema"])) == 0

    meta = _meta(out)
    assert meta["weights"] == ("ema" if use_ema else "model")
    vit = timm.create_model("vit_base_patch16_224", pretrained=False, **json.loads(meta["timm_kwargs"]))
    vit.load_state_dict(load_file(str(out)), strict=True)  # no missing, no unexpected key
    vit.eval()

    _, ours, _ = load_for_eval(res.checkpoint, use_ema=use_ema)
    torch.manual_seed(0)
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        want = ours.encoder.forward_features(x, sigma=torch.zeros(3))
        got = vit.forward_features(x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    # The weights the export was asked for, not the other set: EMA and raw differ after 2 steps.
    _, other, _ = load_for_eval(res.checkpoint, use_ema=not use_ema)
    with torch.no_grad():
        assert not torch.allclose(other.encoder.forward_features(x, sigma=torch.zeros(3)), want)


def test_export_of_missing_checkpoint_is_a_clean_error(tmp_path, capsys):
    from ldae_fast.engine.export import main

    assert main([str(tmp_path / "nope"), str(tmp_path / "x.safetensors")]) == 4  # file error
    assert "error:" in capsys.readouterr().err
