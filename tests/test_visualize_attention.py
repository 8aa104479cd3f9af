"""tools/visualize_attention.py: boxes + one last-layer cross-attention panel per detection, in one PNG."""
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))

import visualize_attention as va  # noqa: E402
from models.attention import MultiheadAttention  # noqa: E402

TINY = ["--backbone", "resnet18", "--backbone_weights", "none", "--hidden_dim", "32", "--dim_feedforward", "64",
        "--nheads", "2", "--enc_layers", "1", "--dec_layers", "1", "--num_queries", "10", "--image_scale", "0.16",
        "--num_workers", "0", "--device", "cpu", "--num_classes", "4"]


@pytest.mark.parametrize("kind", ["torch", "project"])
def test_hook_captures_head_averaged_cross_attention(kind):
    torch.manual_seed(0)
    if kind == "project":
        attention = MultiheadAttention(16, 4)
    else:
        attention = torch.nn.MultiheadAttention(16, 4)
    layer = torch.nn.Module()
    layer.multihead_attn = attention
    model = torch.nn.Module()
    model.transformer = torch.nn.Module()
    model.transformer.decoder = torch.nn.Module()
    model.transformer.decoder.layers = torch.nn.ModuleList([layer])
    query, key = torch.randn(5, 2, 16), torch.randn(7, 2, 16)
    padding = torch.zeros(2, 7, dtype=torch.bool)
    padding[1, 5:] = True
    with va.cross_attention_weights(model) as weights:
        attention(query=query, key=key, value=key, key_padding_mask=padding, need_weights=False)
    got = weights()
    # Reference: the definition, softmax(q k^T / sqrt(head dim)) per head, then the mean over heads.
    w_q, w_k, _ = attention.in_proj_weight.chunk(3)
    b_q, b_k, _ = attention.in_proj_bias.chunk(3)
    q = (query @ w_q.T + b_q).reshape(5, 2, 4, 4).permute(1, 2, 0, 3)
    k = (key @ w_k.T + b_k).reshape(7, 2, 4, 4).permute(1, 2, 0, 3)
    scores = (q @ k.transpose(-1, -2) / 2.0).masked_fill(padding[:, None, None, :], float("-inf"))
    assert torch.allclose(got, scores.softmax(-1).mean(1), atol=1e-6)
    assert got.shape == (2, 5, 7) and torch.all(got[1, :, 5:] == 0)


def test_render_lays_out_one_panel_per_detection():
    picture = Image.new("RGB", (200, 100), (128, 128, 128))
    attention = torch.zeros(2, 4, 7)
    attention[0, 0, 0] = 1.0  # query 0 looks at the top-left cell
    attention[1, 3, 6] = 1.0
    row = va.render(picture, torch.tensor([[10.0, 10.0, 60.0, 50.0], [100.0, 40.0, 190.0, 90.0]]),
                    ["a 0.9", "b 0.8"], [1, 2], attention, max_side=100)
    assert row.size == (3 * 100, 50)
    second = row.crop((100, 0, 200, 50))
    # The heat is brightest where the query attended: top-left of its panel, not bottom-right.
    assert sum(second.getpixel((6, 4))) > sum(second.getpixel((94, 45))) + 100


def test_tool_writes_png_of_expected_size(tmp_path):
    import main
    from models import build_model

    args = main.get_args_parser().parse_args(TINY)
    torch.manual_seed(0)
    model, _, _ = build_model(args)
    torch.save({"model": model.state_dict(), "args": args}, tmp_path / "ckpt.pth")
    Image.new("RGB", (120, 90), (30, 90, 200)).save(tmp_path / "pic.jpg")
    out = va.main(["--resume", str(tmp_path / "ckpt.pth"), "--image", str(tmp_path / "pic.jpg"),
                   "--out", str(tmp_path / "att.png"), "--threshold", "0", "--top_k", "3", "--max_side", "80"])
    with Image.open(out) as written:
        assert written.format == "PNG" and written.size == (4 * 80, 60)
