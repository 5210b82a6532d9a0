import torch
from PIL import Image

from captioner.viz.attention import LABEL, PANEL, attention_panels, save_attention_figure


def test_one_panel_per_word_with_attention_where_it_was(tmp_path):
    image = Image.new("RGB", (64, 48), "white")
    words = ["a", "red", "circle", "left", "of", "a", "square"]
    attention = torch.zeros(len(words), 16)
    attention[:, 0] = 1.0  # every word looks at the top-left cell of a 4x4 grid
    sheet = attention_panels(image, words, attention, columns=5)
    assert sheet.size == (5 * PANEL, 2 * (PANEL + LABEL))  # 7 panels: 5 + 2
    # the attended cell is tinted red, the opposite corner is not
    r, g, b = sheet.getpixel((5, 5))
    assert r > 200 and g < 200
    assert sheet.getpixel((PANEL - 5, PANEL - 5)) == (255, 255, 255)
    # panel 7 (second row, second column) exists; panel 8's place stays blank
    assert sheet.getpixel((PANEL + 5, PANEL + LABEL + 5))[1] < 200
    assert sheet.getpixel((2 * PANEL + 5, PANEL + LABEL + 5)) == (255, 255, 255)


def test_save_attention_figure_is_a_png(tmp_path):
    path = tmp_path / "photo.jpg"
    Image.new("RGB", (40, 40), "blue").save(path)
    result = {"path": str(path), "words": ["blue", "square"],
              "attention": torch.softmax(torch.randn(2, 9), -1)}
    save_attention_figure(result, tmp_path / "att.png")
    with Image.open(tmp_path / "att.png") as im:
        assert im.format == "PNG" and im.size == (2 * PANEL, PANEL + LABEL)
